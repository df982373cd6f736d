//! CUDA-graph capture of the AF2 training step (forward over the recycles, loss, backward through
//! the remat tapes): one graph per recycle count, captured lazily, replayed every step.
//!
//! Recipe (verified on H100/H200, `/work/shared/gpu/README.md`): a device with its own stream
//! ([`graph_device`]: `Device::new_cuda_with_stream`, event tracking off before any tensor
//! exists); candle's host→device cache held on while capturing, after one eager pass of the same
//! code (kernel layouts and small constant tables are uploaded once and served from the cache);
//! `begin_capture` → the step → `end_capture(AUTO_FREE_ON_LAUNCH)`. Every tensor created during
//! the capture becomes a graph memory node, so the step's outputs (loss, loss terms, gradients)
//! land at the same addresses on every replay and are read after it.
//!
//! Inputs are fixed device buffers: the OpenFold-layout feature map (recycling dim last) of one
//! sample, copied in place before each replay ([`StepGraph::prepare`]); the per-cycle features
//! and the loss batch are sliced from it inside the graph. Shapes must not change (crop and MSA
//! sizes padded by the pipeline). Dropout masks come from a [`MaskPool`] per recycle count, its
//! uniforms refilled from the step's seed before the replay.
//!
//! The step code ([`device_step`]) has no host synchronisation: the loss breakdown stays on the
//! device ([`alphafold_loss_on_device`]) and is read after the replay. The optimiser step stays
//! eager.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::config::LossConfig;
use crate::error::{Error, Result};
use crate::loss::total::{alphafold_loss_on_device, breakdown_from_terms};
use crate::loss::{LossBatch, LossBreakdown, LossTables};
use crate::model::alphafold::{AfBatch, AlphaFold};
use crate::model::dropout::DropoutCtx;
use crate::train::optim::Params;

/// What one training step produces, all on the device.
#[derive(Debug, Clone)]
pub struct StepOutputs {
    /// 0-dim scaled loss.
    pub loss: Tensor,
    /// Loss breakdown values (name → 0-dim tensor), see [`breakdown_from_terms`].
    pub terms: Vec<(String, Tensor)>,
    /// Gradient of every parameter by name.
    pub grads: BTreeMap<String, Tensor>,
    /// `[N, 37, 3]` predicted atoms of the last cycle (for training lDDT).
    pub final_atom_positions: Tensor,
}

impl StepOutputs {
    /// The loss value (host read).
    pub fn loss_value(&self) -> Result<f64> {
        Ok(self
            .loss
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_scalar::<f64>()?)
    }

    /// The breakdown (one host read).
    pub fn breakdown(&self) -> Result<LossBreakdown> {
        breakdown_from_terms(&self.terms)
    }
}

/// One training step (forward over `num_recycles + 1` cycles, AF2 loss on the last cycle's labels,
/// backward) on an OpenFold-layout feature map (every tensor's last dim = recycling cycles),
/// without any host synchronisation.
#[allow(clippy::too_many_arguments)]
pub fn device_step(
    model: &AlphaFold,
    params: &Params,
    feats: &BTreeMap<String, Tensor>,
    tables: &LossTables,
    loss_cfg: &LossConfig,
    num_recycles: usize,
    dropout: Option<DropoutCtx>,
) -> Result<StepOutputs> {
    let batch = AfBatch::from_last_dim(feats)?;
    let r = num_recycles.min(batch.cycles.len().saturating_sub(1));
    let lb = LossBatch::from_last_dim(feats, r)?;
    let res = model.loss_and_grads_on_device(params, &batch, r, dropout, |out| {
        let l = alphafold_loss_on_device(&out.loss_outputs(), &lb, tables, loss_cfg)?;
        Ok((l.loss, l.terms))
    })?;
    Ok(StepOutputs {
        loss: res.loss,
        terms: res.aux,
        grads: res.grads,
        final_atom_positions: res.output.final_atom_positions,
    })
}

/// Fresh contiguous copies of `feats` on `dev` (floats as `float_dtype`): the fixed buffers.
pub fn fixed_inputs(
    feats: &BTreeMap<String, Tensor>,
    dev: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    feats
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?.contiguous()?.copy()?)))
        .collect()
}

/// Copy `src` into the fixed buffer `dst` in place (same shape required; dtype converted).
pub fn copy_into(dst: &Tensor, src: &Tensor, name: &str) -> Result<()> {
    if dst.dims() != src.dims() {
        return Err(Error::Train(format!(
            "cuda graph input `{name}`: shape {:?} differs from the captured {:?}",
            src.dims(),
            dst.dims()
        )));
    }
    if dst.elem_count() == 0 {
        return Ok(());
    }
    let src = src.to_device(dst.device())?.to_dtype(dst.dtype())?;
    let (n, dst_flat) = (dst.elem_count(), dst.flatten_all()?);
    dst_flat.slice_set(&src.contiguous()?.reshape(n)?, 0, 0)?;
    Ok(())
}

/// Copy every feature of `feats` into the fixed buffers `inputs` (same key set and shapes).
pub fn copy_inputs(
    inputs: &BTreeMap<String, Tensor>,
    feats: &BTreeMap<String, Tensor>,
) -> Result<()> {
    if inputs.len() != feats.len() || inputs.keys().zip(feats.keys()).any(|(a, b)| a != b) {
        return Err(Error::Train(
            "cuda graph inputs: the feature keys differ from the captured ones".into(),
        ));
    }
    for (k, dst) in inputs {
        copy_into(dst, &feats[k], k)?;
    }
    Ok(())
}

/// Largest difference between two step results: `max |a-b| / max(1e-30, max |a|)` over the loss,
/// every loss term and every gradient, and whether all are bitwise equal.
#[derive(Debug, Clone)]
pub struct StepDiff {
    pub max_rel: f64,
    pub worst: String,
    pub bitwise: bool,
    pub compared: usize,
}

/// Compare two step results tensor by tensor (see [`StepDiff`]).
pub fn compare_steps(a: &StepOutputs, b: &StepOutputs) -> Result<StepDiff> {
    let mut pairs: Vec<(String, &Tensor, &Tensor)> = vec![("loss".into(), &a.loss, &b.loss)];
    for ((n, x), (_, y)) in a.terms.iter().zip(&b.terms) {
        pairs.push((format!("term/{n}"), x, y));
    }
    for (n, x) in &a.grads {
        let y = b
            .grads
            .get(n)
            .ok_or_else(|| Error::Train(format!("compare_steps: no gradient `{n}`")))?;
        pairs.push((format!("grad/{n}"), x, y));
    }
    let mut d = StepDiff {
        max_rel: 0.0,
        worst: String::new(),
        bitwise: true,
        compared: 0,
    };
    for (name, x, y) in pairs {
        let x = x.to_dtype(DType::F64)?.flatten_all()?;
        let y = y.to_dtype(DType::F64)?.flatten_all()?;
        let diff = (&x - &y)?.abs()?.max_all()?.to_device(&Device::Cpu)?;
        let scale = x.abs()?.max_all()?.to_device(&Device::Cpu)?;
        let (diff, scale) = (diff.to_scalar::<f64>()?, scale.to_scalar::<f64>()?);
        let rel = if diff == 0.0 {
            0.0
        } else {
            diff / scale.max(1e-30)
        };
        // NaN anywhere counts as a mismatch.
        let rel = if rel.is_nan() { f64::INFINITY } else { rel };
        if diff != 0.0 {
            d.bitwise = false;
        }
        if rel > d.max_rel || d.worst.is_empty() {
            d.max_rel = d.max_rel.max(rel);
            d.worst = name;
        }
        d.compared += 1;
    }
    Ok(d)
}

#[cfg(feature = "cuda")]
pub use cuda::{capture, graph_device, graph_mem_high, StepGraph};

/// The training device of this rank ([`crate::device::select`]); with `train.cuda_graphs = on`
/// on a CUDA device, the same GPU as a [`graph_device`] (own stream, event tracking off) so the
/// step can be captured.
pub fn select_device(cfg: &crate::config::Config, local_rank: usize) -> Result<Device> {
    let dev = crate::device::select(cfg.train.device, local_rank)?;
    #[cfg(feature = "cuda")]
    if cfg.train.cuda_graphs == crate::config::CudaGraphs::On {
        if let Device::Cuda(cd) = &dev {
            let ordinal = cd.cuda_stream().context().ordinal();
            drop(dev);
            return graph_device(ordinal);
        }
    }
    Ok(dev)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::BTreeMap;

    use candle_core::Device;
    use cudarc::driver::{sys, CudaGraph};

    use super::{copy_inputs, device_step, fixed_inputs, StepOutputs};
    use crate::config::LossConfig;
    use crate::error::{Error, Result};
    use crate::loss::LossTables;
    use crate::model::alphafold::AlphaFold;
    use crate::model::dropout::DropoutCtx;
    use crate::model::dropout_pool::MaskPool;
    use crate::train::optim::Params;

    fn drv<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> Result<T> {
        r.map_err(|e| Error::Train(format!("cuda graph: {what}: {e:?}")))
    }

    /// A CUDA device for graph capture: its own stream, event tracking off. Create it before
    /// any tensor (model parameters included) and use it for everything.
    pub fn graph_device(ordinal: usize) -> Result<Device> {
        let dev = Device::new_cuda_with_stream(ordinal)?;
        if let Device::Cuda(cd) = &dev {
            // SAFETY: everything of the step runs on this device's one stream, so no tensor is
            // used across streams (what event tracking would order).
            unsafe { cd.disable_event_tracking() };
        }
        Ok(dev)
    }

    /// High-water mark of the graph memory pool (what captured graphs allocate), bytes.
    pub fn graph_mem_high(dev: &Device) -> Result<u64> {
        let Device::Cuda(cd) = dev else {
            return Ok(0);
        };
        let ctx = cd.cuda_stream().context().clone();
        drv(ctx.bind_to_thread(), "bind")?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t; `v` outlives the call.
        let r = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                ctx.cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                (&mut v as *mut u64).cast(),
            )
        };
        drv(r.result(), "cuDeviceGetGraphMemAttribute")?;
        Ok(v)
    }

    /// Capture `f` into a graph on `dev` (a [`graph_device`]): one eager run of `f` first (fills
    /// candle's host→device cache; its result is dropped), then `f` under capture. Returns the
    /// graph (not yet launched) and what the captured `f` returned (graph memory: valid after
    /// each launch). The host→device cache must be held on by the caller for the graph's life.
    pub fn capture<T>(dev: &Device, mut f: impl FnMut() -> Result<T>) -> Result<(CudaGraph, T)> {
        let Device::Cuda(cd) = dev else {
            return Err(Error::Train("cuda graphs need a CUDA device".into()));
        };
        drop(f()?);
        dev.synchronize()?;
        let stream = cd.cuda_stream();
        drv(
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "begin_capture",
        )?;
        let out = f();
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let out = out.map_err(|e| Error::Train(format!("cuda graph capture failed: {e}")))?;
        let graph = drv(graph, "end_capture")?
            .ok_or_else(|| Error::Train("cuda graph: capture produced no graph".into()))?;
        Ok((graph, out))
    }

    struct Captured {
        graph: CudaGraph,
        pool: MaskPool,
        out: StepOutputs,
    }

    /// The captured training steps (one per recycle count) and their fixed inputs.
    pub struct StepGraph {
        dev: Device,
        inputs: BTreeMap<String, Tensor>,
        graphs: BTreeMap<usize, Captured>,
        /// Dropout on (training) or off.
        dropout: bool,
        /// Recycle count of the last `prepare`, and its step seed.
        pending: Option<(usize, u64)>,
        /// candle's `CudaGraphHtodCacheGuard` (a private type, hence `Any`).
        _htod: Box<dyn std::any::Any>,
    }

    use candle_core::Tensor;

    impl StepGraph {
        /// Fixed input buffers shaped like `feats` on `dev` (a [`graph_device`]). Holds candle's
        /// host→device cache on for the life of the value (this thread).
        pub fn new(dev: &Device, feats: &BTreeMap<String, Tensor>, dropout: bool) -> Result<Self> {
            let Device::Cuda(cd) = dev else {
                return Err(Error::Train("cuda graphs need a CUDA device".into()));
            };
            if cd.is_event_tracking() {
                return Err(Error::Train(
                    "cuda graphs need a device from train::graph::graph_device (event tracking off)"
                        .into(),
                ));
            }
            let htod: Box<dyn std::any::Any> = Box::new(cd.enable_cuda_graph_htod_cache());
            Ok(Self {
                dev: dev.clone(),
                inputs: fixed_inputs(feats, dev)?,
                graphs: BTreeMap::new(),
                dropout,
                pending: None,
                _htod: htod,
            })
        }

        /// Recycle counts captured so far.
        pub fn captured(&self) -> Vec<usize> {
            self.graphs.keys().copied().collect()
        }

        /// Copy the next sample into the fixed inputs and set the step's dropout seed.
        pub fn prepare(
            &mut self,
            feats: &BTreeMap<String, Tensor>,
            num_recycles: usize,
            seed: u64,
        ) -> Result<()> {
            copy_inputs(&self.inputs, feats)?;
            if let Some(c) = self.graphs.get(&num_recycles) {
                c.pool.refill(seed)?;
            }
            self.pending = Some((num_recycles, seed));
            Ok(())
        }

        fn ctx(&self, seed: u64) -> Option<DropoutCtx> {
            self.dropout.then(|| DropoutCtx::new(seed))
        }

        /// Run the prepared step: replay its graph, capturing it first if this recycle count
        /// has none yet (two eager passes, then the capture). Returns the outputs (valid until
        /// the next `run`).
        pub fn run(
            &mut self,
            model: &AlphaFold,
            params: &Params,
            tables: &LossTables,
            loss_cfg: &LossConfig,
        ) -> Result<&StepOutputs> {
            let (r, seed) = self
                .pending
                .ok_or_else(|| Error::Train("StepGraph::run before prepare".into()))?;
            if !self.graphs.contains_key(&r) {
                let c = self.capture(model, params, tables, loss_cfg, r, seed)?;
                self.graphs.insert(r, c);
            }
            let c = self
                .graphs
                .get(&r)
                .ok_or_else(|| Error::Train("cuda graph missing".into()))?;
            drv(c.graph.launch(), "launch")?;
            Ok(&c.out)
        }

        /// The same step run eagerly on the same fixed inputs and dropout pool (the reference a
        /// replay must equal). Needs the recycle count captured.
        pub fn eager(
            &self,
            model: &AlphaFold,
            params: &Params,
            tables: &LossTables,
            loss_cfg: &LossConfig,
        ) -> Result<StepOutputs> {
            let (r, seed) = self
                .pending
                .ok_or_else(|| Error::Train("StepGraph::eager before prepare".into()))?;
            let c = self
                .graphs
                .get(&r)
                .ok_or_else(|| Error::Train(format!("no graph captured for {r} recycles")))?;
            let _g = c.pool.install();
            c.pool.begin_step();
            device_step(
                model,
                params,
                &self.inputs,
                tables,
                loss_cfg,
                r,
                self.ctx(seed),
            )
        }

        fn capture(
            &self,
            model: &AlphaFold,
            params: &Params,
            tables: &LossTables,
            loss_cfg: &LossConfig,
            r: usize,
            seed: u64,
        ) -> Result<Captured> {
            let run = |pool: &MaskPool| -> Result<StepOutputs> {
                let _g = pool.install();
                pool.begin_step();
                device_step(
                    model,
                    params,
                    &self.inputs,
                    tables,
                    loss_cfg,
                    r,
                    self.ctx(seed),
                )
            };
            // 1. Size the dropout pool (masks from the host path this once).
            let pool = MaskPool::sizing();
            drop(run(&pool)?);
            pool.allocate(&self.dev)?;
            pool.refill(seed)?;
            // 2. Warm pass on the pool: fills the host→device cache with every small upload.
            drop(run(&pool)?);
            self.dev.synchronize()?;
            // 3. Capture.
            let Device::Cuda(cd) = &self.dev else {
                return Err(Error::Train("cuda graphs need a CUDA device".into()));
            };
            let stream = cd.cuda_stream();
            drv(
                stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                "begin_capture",
            )?;
            let out = run(&pool);
            let graph = stream.end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            let out = out.map_err(|e| {
                Error::Train(format!(
                    "cuda graph capture ({r} recycles) failed in the step: {e}"
                ))
            })?;
            let graph = drv(graph, "end_capture")?
                .ok_or_else(|| Error::Train("cuda graph: capture produced no graph".into()))?;
            Ok(Captured { graph, pool, out })
        }
    }
}
