//! Dedicated evaluation ranks (`parallel.eval_ranks = N`, MPI/CPU runs): the last `N` world ranks
//! do not train; they evaluate snapshots of the EMA weights handed over by training rank 0.
//!
//! Communicators: the world is split into the training ranks (which build their DP × DAP grid on
//! it) and the evaluation ranks; an [`EvalLink`] joins training rank 0 (its rank 0) and the
//! evaluation ranks (ranks `1..=N`, in world order).
//!
//! Protocol over the link:
//! - Job: training rank 0 broadcasts a header `[kind, step, len]` (`kind` 1 = evaluate, 0 = stop),
//!   then the EMA weights as one flat f32 buffer (parameters in sorted name order). At most one job
//!   is in flight, so the evaluation ranks are idle in the broadcast when it starts: training
//!   waits only for the copy of the weights, never for an evaluation.
//! - Result: every evaluation rank evaluates its shard of the validation chains (chain `i` on
//!   evaluation rank `i % N`) and sends `{"step", "metrics" | "error", "time"}` (JSON bytes, tag
//!   [`TAG_RESULT`]) to training rank 0, which probes for the results without blocking at step
//!   boundaries and merges them (shard order) once all `N` are here.
//! - Stop: after the run (and its last evaluation) training rank 0 broadcasts a stop header; the
//!   evaluation ranks leave their loop and exit 0.
//!
//! On the trainer's side [`RemoteEval`] has the interface of [`AsyncEval`] (submit, poll, wait,
//! take): the trainer agrees on the result across the training ranks exactly as in thread mode.
//! Training ranks other than 0 hold no link: their result is empty metrics, available at once
//! (rank 0 alone decides when a result is taken, through the trainer's `Collective::any`).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use mpi::point_to_point::MatchedReceiveVec;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

use crate::error::{Error, Result};
use crate::parallel::ParallelCtx;
use crate::train::eval::{AsyncEval, EvalDone, Evaluator};

/// MPI tag of an evaluation result message.
pub const TAG_RESULT: i32 = 0x4556;

const KIND_STOP: u64 = 0;
const KIND_EVAL: u64 = 1;

fn comm_err(rank: usize, msg: impl Into<String>) -> Error {
    Error::Comm {
        rank,
        msg: msg.into(),
    }
}

/// The communicator of training rank 0 (rank 0) and the evaluation ranks (`1..=N`).
pub struct EvalLink {
    // `Some` until drop (see `Drop`).
    comm: Option<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: ParallelCtx initialises MPI at thread level Multiple, so MPI calls on this handle are
// allowed from any thread; the link is only used by one thread at a time (`&mut self` or owned).
unsafe impl Send for EvalLink {}

impl std::fmt::Debug for EvalLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvalLink(rank {}/{})", self.rank, self.size)
    }
}

impl Drop for EvalLink {
    fn drop(&mut self) {
        if let Some(c) = self.comm.take() {
            if mpi::environment::is_finalized() {
                std::mem::forget(c);
            }
        }
    }
}

impl EvalLink {
    /// Collective over the world: the link of training rank 0 and the ranks `train_ranks..`;
    /// `None` on the other training ranks.
    pub fn new(ctx: &ParallelCtx, train_ranks: usize) -> Result<Option<Self>> {
        let member = ctx.rank == 0 || ctx.rank >= train_ranks;
        let color = if member {
            Color::with_value(0)
        } else {
            Color::undefined()
        };
        let key = i32::try_from(ctx.rank).map_err(|_| comm_err(ctx.rank, "rank overflows i32"))?;
        let comm = ctx.world().split_by_color_with_key(color, key);
        match (member, comm) {
            (false, _) => Ok(None),
            (true, None) => Err(comm_err(
                ctx.rank,
                "evaluation link: split gave no communicator",
            )),
            (true, Some(c)) => {
                let rank = usize::try_from(c.rank()).unwrap_or(0);
                let size = usize::try_from(c.size()).unwrap_or(0);
                Ok(Some(Self {
                    comm: Some(c),
                    rank,
                    size,
                }))
            }
        }
    }

    /// Rank in the link (0 = training rank 0).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of evaluation ranks.
    pub fn eval_ranks(&self) -> usize {
        self.size.saturating_sub(1)
    }

    fn comm(&self) -> Result<&SimpleCommunicator> {
        self.comm
            .as_ref()
            .ok_or_else(|| comm_err(self.rank, "evaluation link already released"))
    }

    /// Training rank 0: hand the weights of `step` to the evaluation ranks (sorted name order).
    pub fn send_weights(&self, step: u64, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut flat: Vec<f32> = Vec::new();
        for t in weights.values() {
            let t = t
                .to_device(&Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        let comm = self.comm()?;
        let root = comm.process_at_rank(0);
        let mut header = [KIND_EVAL, step, flat.len() as u64];
        root.broadcast_into(&mut header[..]);
        root.broadcast_into(&mut flat[..]);
        Ok(())
    }

    /// Training rank 0: tell the evaluation ranks to exit.
    pub fn send_stop(&self) -> Result<()> {
        let comm = self.comm()?;
        let mut header = [KIND_STOP, 0, 0];
        comm.process_at_rank(0).broadcast_into(&mut header[..]);
        Ok(())
    }

    /// Evaluation rank: the next job, `None` for stop. `shapes`: the parameters in sorted name
    /// order, to cut the flat buffer.
    pub fn recv_job(
        &self,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Option<(u64, BTreeMap<String, Tensor>)>> {
        let comm = self.comm()?;
        let root = comm.process_at_rank(0);
        let mut header = [0u64; 3];
        root.broadcast_into(&mut header[..]);
        if header[0] == KIND_STOP {
            return Ok(None);
        }
        let step = header[1];
        let len = usize::try_from(header[2]).unwrap_or(usize::MAX);
        let mut flat = vec![0f32; len];
        root.broadcast_into(&mut flat[..]);
        let want: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        if want != len {
            return Err(comm_err(
                self.rank,
                format!("step {step}: received {len} weights, the model has {want}"),
            ));
        }
        let mut out = BTreeMap::new();
        let mut at = 0;
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let t = Tensor::from_slice(&flat[at..at + n], shape.as_slice(), &Device::Cpu)?;
            out.insert(name.clone(), t);
            at += n;
        }
        Ok(Some((step, out)))
    }

    /// Evaluation rank: send the result of `step` to training rank 0.
    pub fn send_result(
        &self,
        step: u64,
        metrics: &std::result::Result<BTreeMap<String, f64>, String>,
        time_s: f64,
    ) -> Result<()> {
        let body = match metrics {
            Ok(m) => {
                // Non-finite values travel as null.
                let wire: BTreeMap<&String, Option<f64>> = m
                    .iter()
                    .map(|(k, v)| (k, v.is_finite().then_some(*v)))
                    .collect();
                serde_json::json!({"step": step, "metrics": wire, "time": time_s})
            }
            Err(e) => serde_json::json!({"step": step, "error": e, "time": time_s}),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| Error::Train(e.to_string()))?;
        self.comm()?
            .process_at_rank(0)
            .send_with_tag(&bytes[..], TAG_RESULT);
        Ok(())
    }

    /// Training rank 0: one result message, if one is here (`block`: wait for one).
    fn recv_result(&self, block: bool) -> Result<Option<Part>> {
        let comm = self.comm()?;
        let any = comm.any_process();
        let probed = if block {
            any.matched_probe_with_tag(TAG_RESULT)
        } else {
            match any.immediate_matched_probe_with_tag(TAG_RESULT) {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        let source = usize::try_from(probed.1.source_rank()).unwrap_or(0);
        let (bytes, _) = probed.matched_receive_vec::<u8>();
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Train(format!("evaluation rank {source}: bad result: {e}")))?;
        let step = v["step"].as_u64().unwrap_or(u64::MAX);
        let time = v["time"].as_f64().unwrap_or(0.0);
        let metrics = match v.get("metrics") {
            Some(m) => {
                let m: BTreeMap<String, Option<f64>> = serde_json::from_value(m.clone())
                    .map_err(|e| Error::Train(format!("evaluation rank {source}: {e}")))?;
                Ok(m.into_iter()
                    .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                    .collect())
            }
            None => Err(v["error"].as_str().unwrap_or("unknown error").to_string()),
        };
        Ok(Some(Part {
            source,
            step,
            metrics,
            time,
        }))
    }
}

/// One evaluation rank's result.
struct Part {
    source: usize,
    step: u64,
    metrics: std::result::Result<BTreeMap<String, f64>, String>,
    time: f64,
}

/// Merges the evaluation ranks' metrics (in shard order), e.g. [`crate::train::Task::merge_eval`].
pub type MergeFn = Box<dyn Fn(Vec<BTreeMap<String, f64>>) -> BTreeMap<String, f64> + Send>;

/// The trainer's side of the dedicated evaluation ranks (interface of [`AsyncEval`]).
pub struct RemoteEval {
    /// `Some` on training rank 0.
    link: Option<EvalLink>,
    merge: MergeFn,
    pending: Option<(u64, Instant)>,
    parts: Vec<Part>,
    ready: Option<EvalDone>,
    stopped: bool,
}

impl std::fmt::Debug for RemoteEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEval")
            .field("link", &self.link)
            .field("pending", &self.pending.map(|p| p.0))
            .finish()
    }
}

impl RemoteEval {
    /// `link`: `Some` on training rank 0 (from [`EvalLink::new`]), `None` on other training ranks.
    pub fn new(link: Option<EvalLink>, merge: MergeFn) -> Self {
        Self {
            link,
            merge,
            pending: None,
            parts: Vec::new(),
            ready: None,
            stopped: false,
        }
    }

    pub fn pending_step(&self) -> Option<u64> {
        self.pending.map(|p| p.0)
    }

    /// Hand the weights of `step` to the evaluation ranks (training rank 0; the others only
    /// record the step). Errors if an evaluation is in flight.
    pub fn submit(&mut self, step: u64, weights: BTreeMap<String, Tensor>) -> Result<()> {
        if let Some((s, _)) = self.pending {
            return Err(Error::Train(format!(
                "evaluation of step {s} still in flight while submitting step {step}"
            )));
        }
        if self.stopped {
            return Err(Error::Train("the evaluation ranks were stopped".into()));
        }
        if let Some(link) = &self.link {
            link.send_weights(step, &weights)?;
        }
        self.pending = Some((step, Instant::now()));
        self.parts.clear();
        Ok(())
    }

    /// Collect result messages (`block`: until all are here). True when complete.
    fn collect(&mut self, block: bool) -> Result<bool> {
        let Some((want, t0)) = self.pending else {
            return Ok(true);
        };
        if self.ready.is_some() {
            return Ok(true);
        }
        let Some(link) = &self.link else {
            self.ready = Some(EvalDone {
                step: want,
                metrics: Ok(BTreeMap::new()),
                eval_time_s: 0.0,
                latency_s: t0.elapsed().as_secs_f64(),
            });
            return Ok(true);
        };
        let n = link.eval_ranks();
        while self.parts.len() < n {
            let Some(p) = link.recv_result(block)? else {
                return Ok(false);
            };
            if p.step != want {
                return Err(Error::Train(format!(
                    "evaluation rank {}: result of step {}, expected step {want}",
                    p.source, p.step
                )));
            }
            self.parts.push(p);
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.source);
        let eval_time_s = parts.iter().map(|p| p.time).fold(0.0, f64::max);
        let metrics = parts
            .into_iter()
            .map(|p| {
                p.metrics
                    .map_err(|e| format!("evaluation rank {}: {e}", p.source))
            })
            .collect::<std::result::Result<Vec<_>, String>>()
            .map(|ms| (self.merge)(ms));
        self.ready = Some(EvalDone {
            step: want,
            metrics,
            eval_time_s,
            latency_s: t0.elapsed().as_secs_f64(),
        });
        Ok(true)
    }

    /// Non-blocking: true when the in-flight evaluation's result is here (or nothing in flight).
    pub fn poll(&mut self) -> Result<bool> {
        self.collect(false)
    }

    /// Block until the in-flight evaluation's result is here, and take it.
    pub fn wait(&mut self) -> Result<Option<EvalDone>> {
        if self.pending.is_none() {
            return Ok(None);
        }
        self.collect(true)?;
        Ok(self.take())
    }

    pub fn take(&mut self) -> Option<EvalDone> {
        let done = self.ready.take()?;
        self.pending = None;
        Some(done)
    }

    /// Wait for the evaluation in flight (its result is dropped) and stop the evaluation ranks.
    /// Idempotent.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if self.pending.is_some() {
            self.collect(true)?;
            self.take();
        }
        self.stopped = true;
        if let Some(link) = &self.link {
            link.send_stop()?;
        }
        Ok(())
    }
}

impl Drop for RemoteEval {
    fn drop(&mut self) {
        // Best effort on error paths: let the evaluation ranks exit.
        if !self.stopped && !mpi::environment::is_finalized() {
            self.stopped = true;
            if let Some(link) = &self.link {
                let _ = link.send_stop();
            }
        }
    }
}

/// The trainer's evaluation backend: a thread of this rank, or the dedicated evaluation ranks.
#[derive(Debug)]
pub enum EvalBackend {
    Thread(AsyncEval),
    Ranks(RemoteEval),
}

impl EvalBackend {
    pub fn pending_step(&self) -> Option<u64> {
        match self {
            EvalBackend::Thread(a) => a.pending_step(),
            EvalBackend::Ranks(r) => r.pending_step(),
        }
    }
    pub fn submit(&mut self, step: u64, weights: BTreeMap<String, Tensor>) -> Result<()> {
        match self {
            EvalBackend::Thread(a) => a.submit(step, weights),
            EvalBackend::Ranks(r) => r.submit(step, weights),
        }
    }
    pub fn poll(&mut self) -> Result<bool> {
        match self {
            EvalBackend::Thread(a) => a.poll(),
            EvalBackend::Ranks(r) => r.poll(),
        }
    }
    pub fn wait(&mut self) -> Result<Option<EvalDone>> {
        match self {
            EvalBackend::Thread(a) => a.wait(),
            EvalBackend::Ranks(r) => r.wait(),
        }
    }
    pub fn take(&mut self) -> Option<EvalDone> {
        match self {
            EvalBackend::Thread(a) => a.take(),
            EvalBackend::Ranks(r) => r.take(),
        }
    }
    /// True for the dedicated evaluation ranks (results arrive merged on training rank 0).
    pub fn is_ranks(&self) -> bool {
        matches!(self, EvalBackend::Ranks(_))
    }
    /// Dedicated ranks: stop them (see [`RemoteEval::shutdown`]); nothing for the thread.
    pub fn shutdown(&mut self) -> Result<()> {
        match self {
            EvalBackend::Thread(_) => Ok(()),
            EvalBackend::Ranks(r) => r.shutdown(),
        }
    }
}

/// An evaluation rank's loop: receive weights → evaluate → send the metrics, until stopped.
/// `shapes`: the model's parameters in sorted name order.
pub fn eval_rank_loop(
    link: &EvalLink,
    shapes: &[(String, Vec<usize>)],
    evaluator: &mut dyn Evaluator,
) -> Result<()> {
    while let Some((step, weights)) = link.recv_job(shapes)? {
        let t0 = Instant::now();
        let out = evaluator
            .evaluate(step, &weights)
            .map_err(|e| e.to_string());
        drop(weights);
        link.send_result(step, &out, t0.elapsed().as_secs_f64())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights() -> BTreeMap<String, Tensor> {
        let mut w = BTreeMap::new();
        w.insert(
            "a".to_string(),
            Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        w
    }

    /// A training rank other than 0 (no link): one job at a time, its (empty) result available
    /// at once, stop idempotent and final.
    #[test]
    fn follower_rank_protocol() {
        let mut r = RemoteEval::new(None, Box::new(|mut p| p.pop().unwrap_or_default()));
        assert!(r.poll().unwrap());
        assert!(r.wait().unwrap().is_none());
        r.submit(3, weights()).unwrap();
        assert_eq!(r.pending_step(), Some(3));
        assert!(r.submit(4, weights()).is_err());
        assert!(r.poll().unwrap());
        let d = r.take().unwrap();
        assert_eq!(d.step, 3);
        assert!(d.metrics.unwrap().is_empty());
        assert_eq!(r.pending_step(), None);
        r.submit(5, weights()).unwrap();
        let mut b = EvalBackend::Ranks(r);
        assert!(b.is_ranks());
        assert_eq!(b.wait().unwrap().unwrap().step, 5);
        b.submit(6, weights()).unwrap();
        b.shutdown().unwrap();
        assert_eq!(
            b.pending_step(),
            None,
            "shutdown waits for the job in flight"
        );
        b.shutdown().unwrap();
        assert!(b.submit(7, weights()).is_err(), "stopped");
    }
}
