//! A toy [`Task`] for testing the trainer without the AF2 model: a 2-layer MLP (tanh) regressing
//! the output of a fixed random "teacher" MLP on seeded Gaussian inputs, with seeded label noise.
//!
//! Everything is derived from the seed: the initial weights, the teacher, the sample stream (indexed
//! by the number of samples consumed, which is the checkpointed data position) and the noise (from
//! the step's RNG in [`StepCtx`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::train::eval::{Evaluator, EvaluatorFactory};
use crate::train::optim::Params;
use crate::train::seed::{seed_for, Rng};
use crate::train::task::{StepCtx, StepOutput, Task};

/// Toy task settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyConfig {
    pub seed: u64,
    pub in_dim: usize,
    pub hidden: usize,
    /// Samples per step.
    pub batch: usize,
    pub noise_std: f64,
    /// Steps whose loss is made NaN (to test skipping).
    pub nan_steps: Vec<u64>,
    /// Sleep this long in every step (to give signal/kill tests time).
    pub step_delay_ms: u64,
    pub eval_size: usize,
    /// Sleep this long in every evaluation (to test asynchronous evaluation).
    pub eval_delay_ms: u64,
    /// Data-parallel sharding `(replica, replicas)`: each step consumes `replicas * batch` samples
    /// of the global stream; replica `r` reads the `r`-th block of `batch`. `(0, 1)` = no sharding.
    pub shard: (usize, usize),
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            in_dim: 8,
            hidden: 16,
            batch: 16,
            noise_std: 0.05,
            nan_steps: Vec::new(),
            step_delay_ms: 0,
            eval_size: 64,
            eval_delay_ms: 0,
            shard: (0, 1),
        }
    }
}

/// The toy task. Parameter names: `mlp.fc1.weight` `[hidden, in]`, `mlp.fc1.bias` `[hidden]`,
/// `mlp.fc2.weight` `[1, hidden]`, `mlp.fc2.bias` `[1]`.
#[derive(Debug)]
pub struct ToyTask {
    pub cfg: ToyConfig,
    params: Params,
    teacher: BTreeMap<String, Tensor>,
    /// Samples consumed so far (the data-loader position).
    pub position: u64,
    eval_x: Tensor,
    eval_y: Tensor,
}

fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        rng.normal_vec_f32(n, std),
        shape,
        &Device::Cpu,
    )?)
}

fn mlp_weights(rng: &mut Rng, cfg: &ToyConfig) -> Result<BTreeMap<String, Tensor>> {
    let s1 = 1.0 / (cfg.in_dim as f64).sqrt();
    let s2 = 1.0 / (cfg.hidden as f64).sqrt();
    let mut w = BTreeMap::new();
    w.insert(
        "mlp.fc1.weight".to_string(),
        randn(rng, &[cfg.hidden, cfg.in_dim], s1)?,
    );
    w.insert("mlp.fc1.bias".to_string(), randn(rng, &[cfg.hidden], 0.1)?);
    w.insert(
        "mlp.fc2.weight".to_string(),
        randn(rng, &[1, cfg.hidden], s2)?,
    );
    w.insert("mlp.fc2.bias".to_string(), randn(rng, &[1], 0.1)?);
    Ok(w)
}

fn get<'a>(w: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    w.get(name)
        .ok_or_else(|| Error::Model(format!("toy MLP has no parameter `{name}`")))
}

/// `[b, in] -> [b, 1]`: `tanh(x W1^T + b1) W2^T + b2`.
fn mlp(w: &BTreeMap<String, Tensor>, x: &Tensor) -> Result<Tensor> {
    let h = x
        .matmul(&get(w, "mlp.fc1.weight")?.t()?)?
        .broadcast_add(get(w, "mlp.fc1.bias")?)?
        .tanh()?; // [b, hidden]
    Ok(h.matmul(&get(w, "mlp.fc2.weight")?.t()?)?
        .broadcast_add(get(w, "mlp.fc2.bias")?)?) // [b, 1]
}

impl ToyTask {
    pub fn new(cfg: ToyConfig) -> Result<Self> {
        let mut init_rng = Rng::new(seed_for(cfg.seed, "toy.init", 0, 0));
        let params = mlp_weights(&mut init_rng, &cfg)?
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<Result<Params>>()?;
        let mut teacher_rng = Rng::new(seed_for(cfg.seed, "toy.teacher", 0, 0));
        let teacher = mlp_weights(&mut teacher_rng, &cfg)?;
        let mut eval_rng = Rng::new(seed_for(cfg.seed, "toy.eval", 0, 0));
        let eval_x = randn(&mut eval_rng, &[cfg.eval_size, cfg.in_dim], 1.0)?;
        let eval_y = mlp(&teacher, &eval_x)?;
        Ok(Self {
            cfg,
            params,
            teacher,
            position: 0,
            eval_x,
            eval_y,
        })
    }

    fn current(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Inputs of the batch starting at sample `position`: one seeded stream per sample.
    fn batch_inputs(&self, position: u64) -> Result<Tensor> {
        let mut xs = Vec::with_capacity(self.cfg.batch * self.cfg.in_dim);
        for i in 0..self.cfg.batch as u64 {
            let mut r = Rng::new(seed_for(self.cfg.seed, "toy.data", 0, position + i));
            xs.extend(r.normal_vec_f32(self.cfg.in_dim, 1.0));
        }
        Ok(Tensor::from_vec(
            xs,
            (self.cfg.batch, self.cfg.in_dim),
            &Device::Cpu,
        )?)
    }
}

impl Task for ToyTask {
    fn params(&self) -> &Params {
        &self.params
    }

    fn step_loss(&mut self, ctx: &StepCtx) -> Result<StepOutput> {
        if self.cfg.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.cfg.step_delay_ms));
        }
        let (replica, replicas) = self.cfg.shard;
        let batch = self.cfg.batch as u64;
        let x = self.batch_inputs(self.position + replica as u64 * batch)?;
        // The position is global (all replicas' samples), as checkpoints require.
        self.position += replicas as u64 * batch;
        let mut rng = ctx.rng;
        let noise = randn(&mut rng, &[self.cfg.batch, 1], self.cfg.noise_std)?;
        let y = (mlp(&self.teacher, &x)? + noise)?;
        let pred = mlp(&self.current(), &x)?;
        let mse = (pred - y)?.sqr()?.mean_all()?;
        let mse_val = f64::from(mse.to_scalar::<f32>()?);
        let loss = if self.cfg.nan_steps.contains(&ctx.step) {
            mse.affine(f64::NAN, 0.0)?
        } else {
            mse
        };
        let mut metrics = BTreeMap::new();
        metrics.insert("mse".to_string(), mse_val);
        Ok(StepOutput {
            loss,
            metrics,
            grads: None,
        })
    }

    fn samples_per_step(&self) -> usize {
        self.cfg.batch
    }

    fn data_state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "samples_consumed": self.position }))
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.position = state
            .get("samples_consumed")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Data {
                what: "toy data state".into(),
                msg: format!("expected {{\"samples_consumed\": N}}, got {state}"),
            })?;
        Ok(())
    }

    fn evaluate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        toy_eval(
            &self.current(),
            &self.eval_x,
            &self.eval_y,
            self.cfg.eval_delay_ms,
        )
    }

    fn evaluator(&self) -> Result<Option<EvaluatorFactory>> {
        let ev = ToyEvaluator {
            x: self.eval_x.clone(),
            y: self.eval_y.clone(),
            delay_ms: self.cfg.eval_delay_ms,
        };
        Ok(Some(Box::new(move || {
            Ok(Box::new(ev) as Box<dyn Evaluator>)
        })))
    }
}

/// Evaluation MSE of the MLP `w` and a stand-in for lDDT-Cα.
fn toy_eval(
    w: &BTreeMap<String, Tensor>,
    x: &Tensor,
    y: &Tensor,
    delay_ms: u64,
) -> Result<BTreeMap<String, f64>> {
    if delay_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    }
    let pred = mlp(w, x)?;
    let mse = (pred - y)?
        .sqr()?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let mut m = BTreeMap::new();
    m.insert("mse".to_string(), mse);
    // A score in (0, 1] that grows as the model improves, standing in for lDDT-Cα.
    m.insert("lddt_ca".to_string(), 1.0 / (1.0 + mse));
    Ok(m)
}

/// The toy task's background evaluator (same computation as [`ToyTask::evaluate`]).
struct ToyEvaluator {
    x: Tensor,
    y: Tensor,
    delay_ms: u64,
}

impl Evaluator for ToyEvaluator {
    fn evaluate(
        &mut self,
        _step: u64,
        weights: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, f64>> {
        toy_eval(weights, &self.x, &self.y, self.delay_ms)
    }
}
