//! Trainer loop on the toy task: resume exactness, skipped steps, EMA evaluation, learning, logs.

mod train_support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use ferrofold::train::checkpoint;
use ferrofold::train::mllog::MlLogger;
use ferrofold::train::toy::{ToyConfig, ToyTask};
use ferrofold::train::{Outcome, Task};
use train_support::*;

/// N steps straight vs k steps, a new trainer resumed from the checkpoint, N - k steps: bitwise equal
/// weights, EMA, Adam moments and counters. A NaN step before and one after the resume point make
/// skipping part of the trajectory.
#[test]
fn resume_is_bitwise_exact() {
    let cfg = toy_config();
    let toy = ToyConfig {
        nan_steps: vec![2, 9],
        ..ToyConfig::default()
    };
    let n = cfg.train.max_steps;

    let straight_dir = run_dir("straight");
    let mut straight = trainer(&cfg, &toy, options(&straight_dir));
    assert_eq!(straight.run().unwrap(), Outcome::Finished { step: n });

    for k in [5u64, 4] {
        // k = 5: checkpoint written at stop time; k = 4: coincides with a periodic checkpoint.
        let dir = run_dir("split");
        let mut o = options(&dir);
        o.stop_at = Some(k);
        let mut first = trainer(&cfg, &toy, o);
        assert_eq!(first.run().unwrap(), Outcome::Finished { step: k });
        drop(first);
        assert_eq!(
            checkpoint::find_latest(&dir).unwrap().unwrap(),
            dir.join(checkpoint::dir_name(k))
        );
        // A fresh task (fresh weights, position 0) resumed from disk.
        let mut resumed = trainer(&cfg, &toy, options(&dir));
        assert_eq!(resumed.step(), k);
        assert_eq!(resumed.run().unwrap(), Outcome::Finished { step: n });

        let a = snapshot(&straight);
        let b = snapshot(&resumed);
        assert_eq!(a.skipped, 2);
        assert_eq!(a, b, "k = {k}: resumed run differs from the straight run");

        // The metrics logs describe the same trajectory (losses bitwise, step by step).
        let la: Vec<_> = metrics_lines(&straight_dir)
            .into_iter()
            .filter(|v| v["kind"] == "train")
            .map(|v| {
                (
                    v["step"].as_u64().unwrap(),
                    v["loss"].clone(),
                    v["lr"].clone(),
                )
            })
            .collect();
        let lb: Vec<_> = metrics_lines(&dir)
            .into_iter()
            .filter(|v| v["kind"] == "train")
            .map(|v| {
                (
                    v["step"].as_u64().unwrap(),
                    v["loss"].clone(),
                    v["lr"].clone(),
                )
            })
            .collect();
        assert_eq!(la.len(), n as usize);
        assert_eq!(la, lb);
    }

    // Sanity: the comparison can fail. One extra step changes the weights.
    let dir = run_dir("extra");
    let mut cfg2 = cfg.clone();
    cfg2.train.max_steps = n + 1;
    let mut longer = trainer(&cfg2, &toy, options(&dir));
    longer.run().unwrap();
    assert_ne!(snapshot(&straight).params, snapshot(&longer).params);
}

#[test]
fn non_finite_step_is_skipped_and_counted() {
    let cfg = toy_config();
    let toy = ToyConfig {
        nan_steps: vec![3],
        ..ToyConfig::default()
    };
    let dir = run_dir("skip");
    let mut t = trainer(&cfg, &toy, options(&dir));
    for _ in 0..3 {
        let r = t.train_step().unwrap();
        assert!(!r.skipped);
    }
    let before = snapshot(&t);
    let r = t.train_step().unwrap();
    assert!(r.skipped && !r.loss.is_finite() && r.skipped_steps == 1);
    let after = snapshot(&t);
    // No update of weights, EMA or Adam state; the step counter and data position advance.
    assert_eq!(before.params, after.params);
    assert_eq!(before.ema, after.ema);
    assert_eq!(before.m, after.m);
    assert_eq!(before.adam_steps, after.adam_steps);
    assert_eq!(after.step, before.step + 1);
    assert_eq!(after.position, before.position + toy.batch as u64);
    let r = t.train_step().unwrap();
    assert!(!r.skipped && r.skipped_steps == 1);
    assert_ne!(snapshot(&t).params, after.params);
    let lines = metrics_lines(&dir);
    let skipped: Vec<u64> = lines
        .iter()
        .filter(|v| v["skipped"] == true)
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![4]);
    assert!(lines[3]["loss"].is_null()); // NaN is written as null
}

/// Evaluation uses the EMA weights and leaves the master weights bitwise untouched.
#[test]
fn eval_uses_ema_and_restores_weights() {
    let cfg = toy_config();
    let toy = ToyConfig::default();
    let dir = run_dir("ema");
    let mut t = trainer(&cfg, &toy, options(&dir));
    for _ in 0..6 {
        t.train_step().unwrap();
    }
    let before = snapshot(&t);
    let got = t.evaluate().unwrap();
    assert_eq!(before, snapshot(&t));
    // Same metrics from a separate task holding the EMA weights...
    let mut other = ToyTask::new(toy.clone()).unwrap();
    for (name, p) in other.params() {
        p.set(&t.ema().weights[name]).unwrap();
    }
    let want = other.evaluate(0).unwrap();
    assert_eq!(got, want);
    // ...and different from the master weights' metrics (EMA decay 0.9 lags behind).
    let master = t.task_mut().evaluate(0).unwrap();
    assert_ne!(master["mse"], got["mse"]);
}

/// The toy model learns: eval MSE with the trained EMA weights is far below the initial one.
#[test]
fn toy_training_reduces_loss() {
    let mut cfg = toy_config();
    cfg.train.max_steps = 300;
    cfg.train.eval_every = 300;
    cfg.train.checkpoint_every = 300;
    cfg.optim.decay_start = 1000;
    cfg.optim.grad_clip_norm = 1.0;
    let toy = ToyConfig::default();
    let initial = ToyTask::new(toy.clone()).unwrap().evaluate(0).unwrap()["mse"];
    let dir = run_dir("learn");
    let mut t = trainer(&cfg, &toy, options(&dir));
    t.run().unwrap();
    let meta = checkpoint::read_meta(&dir.join(checkpoint::dir_name(300))).unwrap();
    let trained = meta.eval["mse"];
    assert!(
        trained < 0.3 * initial,
        "eval mse {initial} -> {trained}: the toy did not learn"
    );
    assert_eq!(meta.lddt_ca(), Some(1.0 / (1.0 + trained)));
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// MLLOG lines and metrics records of a short run: event order, keys, values.
#[test]
fn logs_of_a_short_run() {
    let mut cfg = toy_config();
    cfg.train.max_steps = 6;
    cfg.train.target_lddt_ca = Some(0.0); // reached at the first evaluation (step 3)
    let toy = ToyConfig::default();
    let dir = run_dir("logs");
    let buf = Buf::default();
    let mut o = options(&dir);
    o.mllog = Some(MlLogger::to_writer(Box::new(buf.clone())));
    let mut t = trainer(&cfg, &toy, o);
    let out = t.run().unwrap();
    assert!(
        matches!(out, Outcome::TargetReached { step: 3, .. }),
        "{out:?}"
    );
    assert_eq!(out.exit_code(), 0);
    // Final checkpoint exists at the stopping step and records the eval.
    let meta = checkpoint::read_meta(&dir.join(checkpoint::dir_name(3))).unwrap();
    assert!(meta.lddt_ca().is_some());

    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l.strip_prefix(":::MLLOG ").expect(l)).unwrap())
        .collect();
    let keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys.first(), Some(&"init_start"));
    assert_eq!(keys.last(), Some(&"run_stop"));
    for k in [
        "submission_benchmark",
        "submission_org",
        "submission_division",
        "submission_status",
        "submission_platform",
        "global_batch_size",
        "opt_base_learning_rate",
        "opt_learning_rate_warmup_steps",
        "gradient_clipping",
        "model_parameters_count",
        "init_stop",
        "run_start",
        "epoch_start",
        "epoch_stop",
        "eval_start",
        "eval_accuracy",
        "eval_stop",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    let pos = |k: &str| keys.iter().position(|x| *x == k).unwrap();
    assert!(pos("init_stop") < pos("run_start"));
    assert!(pos("run_start") < pos("epoch_start"));
    assert!(pos("eval_start") < pos("eval_accuracy") && pos("eval_accuracy") < pos("eval_stop"));
    let ev = |k: &str| &events[pos(k)];
    assert_eq!(ev("run_start")["event_type"], "INTERVAL_START");
    assert_eq!(ev("run_stop")["event_type"], "INTERVAL_END");
    assert_eq!(ev("global_batch_size")["event_type"], "POINT_IN_TIME");
    assert_eq!(ev("global_batch_size")["value"], toy.batch);
    assert_eq!(ev("opt_base_learning_rate")["value"], cfg.optim.lr);
    assert_eq!(ev("run_stop")["metadata"]["status"], "success");
    let n_params = (toy.hidden * toy.in_dim + toy.hidden + toy.hidden + 1) as u64;
    assert_eq!(ev("model_parameters_count")["value"], n_params);
    assert!(ev("run_start")["metadata"]["file"]
        .as_str()
        .unwrap()
        .ends_with("trainer.rs"));

    let lines = metrics_lines(&dir);
    let train: Vec<_> = lines.iter().filter(|v| v["kind"] == "train").collect();
    assert_eq!(train.len(), 3);
    for (i, r) in train.iter().enumerate() {
        assert_eq!(r["step"], i as u64 + 1);
        let lr = r["lr"].as_f64().unwrap();
        assert_eq!(lr, ferrofold::train::schedule::lr_at(i as u64, &cfg.optim));
        assert!(r["grad_norm"].as_f64().unwrap() > 0.0);
        assert!(r["samples_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["terms"]["mse"].as_f64().is_some());
        let rec = r["recycles"].as_u64().unwrap() as usize;
        assert_eq!(
            rec,
            ferrofold::train::recycles_for_step(cfg.train.seed, i as u64, 3)
        );
        assert_eq!(r["skipped_steps"], 0);
    }
    let evals: Vec<_> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["step"], 3);
}
