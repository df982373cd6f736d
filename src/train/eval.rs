//! Asynchronous evaluation: a background thread that owns its own model instance (built by the
//! task's [`EvaluatorFactory`]) and evaluates snapshots of the EMA weights while training goes on.
//!
//! Protocol (driven by the trainer, identical on every rank):
//! - At an evaluation step the trainer copies the EMA weights ([`snapshot`]) and [`AsyncEval::submit`]s
//!   them. At most one evaluation is in flight: the trainer first waits for the previous one.
//! - At every step boundary each rank [`AsyncEval::poll`]s (non-blocking); the ranks agree with a
//!   collective that *every* rank has its result before any takes it, so every rank consumes the
//!   result at the same step (and stops at the same step when the target is reached).
//! - At run end, on a stop request, and before a checkpoint the trainer [`AsyncEval::wait`]s.
//!
//! The thread never touches the training state (parameters, optimiser, data loader, RNG): training
//! results do not depend on when evaluations finish.

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};

use crate::error::{Error, Result};

/// Evaluates given weights with a model instance of its own.
pub trait Evaluator {
    /// Evaluate the weights (parameter name → tensor, e.g. an EMA snapshot) of step `step`. Returns
    /// named metrics, as [`crate::train::Task::evaluate`].
    fn evaluate(
        &mut self,
        step: u64,
        weights: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, f64>>;
}

/// Builds an [`Evaluator`] on the evaluation thread (so the evaluator itself need not be `Send`).
pub type EvaluatorFactory = Box<dyn FnOnce() -> Result<Box<dyn Evaluator>> + Send>;

/// A deep copy of `weights` in host memory (fresh storage: later in-place updates of the
/// originals cannot reach it). GPU tensors are copied to the host here, on the training thread at
/// a step boundary: the evaluation thread then never issues work on the training device's stream
/// (which may be capturing a CUDA graph); it uploads the copy to a device of its own
/// ([`eval_device`]).
pub fn snapshot(weights: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    weights
        .iter()
        .map(|(k, t)| {
            let c = if t.device().is_cpu() {
                t.copy()?
            } else {
                t.to_device(&Device::Cpu)?
            };
            Ok((k.clone(), c))
        })
        .collect()
}

/// The device an evaluation thread computes on: for a CUDA training device, a new device handle
/// on the same GPU with a stream of its own (evaluation kernels neither wait behind nor join the
/// training stream); otherwise the training device.
pub fn eval_device(train: &Device) -> Result<Device> {
    match train.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Ok(Device::new_cuda_with_stream(gpu_id)?),
        _ => Ok(train.clone()),
    }
}

/// What the thread sends back: `(step, metrics or error message, seconds)`.
type JobResult = (u64, std::result::Result<BTreeMap<String, f64>, String>, f64);

struct Job {
    step: u64,
    weights: BTreeMap<String, Tensor>,
}

/// The result of one background evaluation.
#[derive(Debug)]
pub struct EvalDone {
    /// The step whose weights were evaluated.
    pub step: u64,
    /// Metrics, or the evaluation's error message.
    pub metrics: std::result::Result<BTreeMap<String, f64>, String>,
    /// Seconds the evaluation itself took (on the thread).
    pub eval_time_s: f64,
    /// Seconds from submission to the result being taken.
    pub latency_s: f64,
}

/// The background evaluation thread and its one in-flight job.
pub struct AsyncEval {
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    handle: Option<JoinHandle<()>>,
    /// `(step, submitted at)` of the job in flight.
    pending: Option<(u64, Instant)>,
    /// A result received by [`AsyncEval::poll`] and not yet taken.
    ready: Option<EvalDone>,
}

impl std::fmt::Debug for AsyncEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEval")
            .field("pending", &self.pending.map(|p| p.0))
            .field("ready", &self.ready.as_ref().map(|r| r.step))
            .finish()
    }
}

impl AsyncEval {
    /// Start the evaluation thread; `factory` runs on it (its error is the first job's result).
    pub fn spawn(factory: EvaluatorFactory) -> Result<Self> {
        let (job_tx, job_rx) = bounded::<Job>(1);
        let (res_tx, res_rx) = bounded::<JobResult>(1);
        let handle = std::thread::Builder::new()
            .name("ferrofold-eval".into())
            .spawn(move || {
                let mut evaluator = factory().map_err(|e| e.to_string());
                for job in job_rx {
                    let t0 = Instant::now();
                    let out = match &mut evaluator {
                        Ok(ev) => ev
                            .evaluate(job.step, &job.weights)
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(format!("cannot build the evaluator: {e}")),
                    };
                    drop(job.weights);
                    if res_tx
                        .send((job.step, out, t0.elapsed().as_secs_f64()))
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Train(format!("cannot start the evaluation thread: {e}")))?;
        Ok(Self {
            jobs: Some(job_tx),
            results: res_rx,
            handle: Some(handle),
            pending: None,
            ready: None,
        })
    }

    /// Step of the evaluation in flight (submitted, result not yet taken).
    pub fn pending_step(&self) -> Option<u64> {
        self.pending.map(|p| p.0)
    }

    /// Hand `weights` of step `step` to the thread. Errors if an evaluation is still in flight.
    pub fn submit(&mut self, step: u64, weights: BTreeMap<String, Tensor>) -> Result<()> {
        if let Some((s, _)) = self.pending {
            return Err(Error::Train(format!(
                "evaluation of step {s} still in flight while submitting step {step}"
            )));
        }
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Train("the evaluation thread was shut down".into()))?;
        jobs.send(Job { step, weights })
            .map_err(|_| Error::Train("the evaluation thread has died".into()))?;
        self.pending = Some((step, Instant::now()));
        Ok(())
    }

    fn received(&mut self, r: JobResult) -> Result<()> {
        let (step, metrics, eval_time_s) = r;
        let (want, t0) = self
            .pending
            .ok_or_else(|| Error::Train(format!("unexpected evaluation result of step {step}")))?;
        if step != want {
            return Err(Error::Train(format!(
                "evaluation result of step {step}, expected step {want}"
            )));
        }
        self.ready = Some(EvalDone {
            step,
            metrics,
            eval_time_s,
            latency_s: t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// Non-blocking: true when the in-flight evaluation's result is here (or nothing is in
    /// flight). An error if the thread died.
    pub fn poll(&mut self) -> Result<bool> {
        if self.pending.is_none() || self.ready.is_some() {
            return Ok(true);
        }
        match self.results.try_recv() {
            Ok(r) => {
                self.received(r)?;
                Ok(true)
            }
            Err(TryRecvError::Empty) => Ok(false),
            Err(TryRecvError::Disconnected) => Err(self.died()),
        }
    }

    /// Block until the in-flight evaluation's result is here, and take it (`None`: nothing in
    /// flight).
    pub fn wait(&mut self) -> Result<Option<EvalDone>> {
        if self.pending.is_none() {
            return Ok(None);
        }
        if self.ready.is_none() {
            match self.results.recv() {
                Ok(r) => self.received(r)?,
                Err(_) => return Err(self.died()),
            }
        }
        Ok(self.take())
    }

    /// Take the result received by [`AsyncEval::poll`], if any.
    pub fn take(&mut self) -> Option<EvalDone> {
        let done = self.ready.take()?;
        self.pending = None;
        Some(done)
    }

    fn died(&mut self) -> Error {
        let why = match self.handle.take().map(JoinHandle::join) {
            Some(Err(panic)) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
            _ => "exited".into(),
        };
        Error::Train(format!("the evaluation thread died ({why})"))
    }
}

impl Drop for AsyncEval {
    fn drop(&mut self) {
        // Closing the job channel ends the thread after its current job. Not joined: an error path
        // must not wait for a long evaluation (the process is about to end anyway).
        self.jobs = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sum {
        delay_ms: u64,
    }

    impl Evaluator for Sum {
        fn evaluate(
            &mut self,
            step: u64,
            weights: &BTreeMap<String, Tensor>,
        ) -> Result<BTreeMap<String, f64>> {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
            if step == 99 {
                return Err(Error::Train("boom".into()));
            }
            let mut m = BTreeMap::new();
            for (k, t) in weights {
                m.insert(k.clone(), f64::from(t.sum_all()?.to_scalar::<f32>()?));
            }
            m.insert("step".into(), step as f64);
            Ok(m)
        }
    }

    fn weights(v: f32) -> BTreeMap<String, Tensor> {
        let mut w = BTreeMap::new();
        w.insert("a".to_string(), Tensor::full(v, 3, &Device::Cpu).unwrap());
        w
    }

    #[test]
    fn one_job_at_a_time_results_in_order() {
        let mut ev =
            AsyncEval::spawn(Box::new(|| Ok(Box::new(Sum { delay_ms: 30 }) as _))).unwrap();
        assert!(ev.poll().unwrap());
        assert!(ev.wait().unwrap().is_none());
        ev.submit(3, weights(1.0)).unwrap();
        assert_eq!(ev.pending_step(), Some(3));
        assert!(ev.submit(4, weights(2.0)).is_err());
        let d = ev.wait().unwrap().unwrap();
        assert_eq!(d.step, 3);
        let m = d.metrics.unwrap();
        assert_eq!((m["a"], m["step"]), (3.0, 3.0));
        assert!(d.latency_s >= d.eval_time_s && d.eval_time_s >= 0.03);
        assert_eq!(ev.pending_step(), None);
        ev.submit(6, weights(2.0)).unwrap();
        while !ev.poll().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let d = ev.take().unwrap();
        assert_eq!((d.step, d.metrics.unwrap()["a"]), (6, 6.0));
        ev.submit(99, weights(0.0)).unwrap();
        let d = ev.wait().unwrap().unwrap();
        assert!(d.metrics.unwrap_err().contains("boom"));
    }

    #[test]
    fn snapshot_is_independent_of_the_source() {
        let v = candle_core::Var::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut w = BTreeMap::new();
        w.insert("v".to_string(), v.as_tensor().clone());
        let snap = snapshot(&w).unwrap();
        v.set(&Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let s: f32 = snap["v"].sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(s, 0.0);
    }

    #[test]
    fn factory_error_is_the_first_result() {
        let mut ev = AsyncEval::spawn(Box::new(|| Err(Error::Train("no model".into())))).unwrap();
        ev.submit(1, weights(1.0)).unwrap();
        let d = ev.wait().unwrap().unwrap();
        assert!(d.metrics.unwrap_err().contains("no model"));
    }
}
