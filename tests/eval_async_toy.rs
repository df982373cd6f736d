//! Asynchronous evaluation in the trainer loop (toy task): the same metrics as synchronous
//! evaluation at the same steps, training untouched by the evaluation mode (bitwise), the lDDT
//! target stops an async run with MLLOG success, a run ending with an evaluation in flight still
//! logs it, checkpoints of evaluated steps get their metrics, resume stays bitwise exact.

mod train_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};

use ferrofold::config::{Config, EvalMode};
use ferrofold::train::checkpoint;
use ferrofold::train::mllog::MlLogger;
use ferrofold::train::toy::ToyConfig;
use ferrofold::train::{Outcome, Resume};
use train_support::{metrics_lines, options, run_dir, snapshot, toy_config, trainer, Snapshot};

/// Shared in-memory MLLOG sink.
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

impl Buf {
    fn events(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l.strip_prefix(":::MLLOG ").expect(l)).unwrap())
            .collect()
    }
}

/// `step -> metrics` of the eval records of metrics.jsonl (each step once).
fn eval_records(dir: &std::path::Path) -> BTreeMap<u64, BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for v in metrics_lines(dir) {
        if v["kind"] == "eval" {
            let m: BTreeMap<String, f64> = serde_json::from_value(v["metrics"].clone()).unwrap();
            let step = v["step"].as_u64().unwrap();
            assert!(
                out.insert(step, m).is_none(),
                "eval of step {step} logged twice"
            );
        }
    }
    out
}

/// Training losses by step, as bits.
fn losses(dir: &std::path::Path) -> Vec<(u64, u64)> {
    metrics_lines(dir)
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

/// `(step, eval metrics)` of every checkpoint left in the run directory.
fn checkpoints(dir: &std::path::Path) -> Vec<(u64, BTreeMap<String, f64>)> {
    checkpoint::list(dir)
        .unwrap()
        .into_iter()
        .map(|(s, d)| (s, checkpoint::read_meta(&d).unwrap().eval))
        .collect()
}

fn run_mode(cfg: &Config, toy: &ToyConfig, mode: EvalMode) -> (train_support::RunDir, Snapshot) {
    let mut cfg = cfg.clone();
    cfg.train.eval_mode = mode;
    let dir = run_dir(&format!("{mode:?}"));
    let mut t = trainer(&cfg, toy, options(&dir));
    assert_eq!(
        t.eval_is_async(),
        mode == EvalMode::Async && cfg.train.eval_every > 0
    );
    let out = t.run().unwrap();
    assert_eq!(out, Outcome::Finished { step: 12 });
    let snap = snapshot(&t);
    (dir, snap)
}

/// Sync and async evaluation give the same metrics at the same steps, the same checkpoints (with
/// the same metrics; retention keeps the same best), and training is bitwise the same with eval
/// sync, async or off.
#[test]
fn eval_async_matches_sync_and_leaves_training_unchanged() {
    let mut cfg = toy_config();
    cfg.train.max_steps = 12;
    cfg.train.eval_every = 2;
    cfg.train.checkpoint_every = 2;
    cfg.train.keep_last = 1;
    // Evaluations slower than steps: several steps run while one is in flight.
    let toy = ToyConfig {
        eval_delay_ms: 40,
        step_delay_ms: 5,
        ..ToyConfig::default()
    };
    let (d_sync, s_sync) = run_mode(&cfg, &toy, EvalMode::Sync);
    let (d_async, s_async) = run_mode(&cfg, &toy, EvalMode::Async);
    let mut off = cfg.clone();
    off.train.eval_every = 0;
    let (d_off, s_off) = run_mode(&off, &toy, EvalMode::Async);
    assert_eq!(
        s_sync, s_async,
        "training state differs: sync vs async eval"
    );
    assert_eq!(s_sync, s_off, "training state differs: eval vs no eval");
    assert_eq!(losses(&d_sync), losses(&d_async));
    assert_eq!(losses(&d_sync), losses(&d_off));
    assert_eq!(losses(&d_sync).len(), 12);

    let e_sync = eval_records(&d_sync);
    let e_async = eval_records(&d_async);
    assert_eq!(
        e_sync.keys().copied().collect::<Vec<_>>(),
        vec![2, 4, 6, 8, 10, 12]
    );
    assert_eq!(e_sync, e_async, "async metrics differ from sync metrics");
    assert!(eval_records(&d_off).is_empty());

    // Checkpoints: the same survivors with the same metrics (the async run adds them after the
    // checkpoint was written), chosen by the best-lDDT policy over every evaluated step.
    let c_sync = checkpoints(&d_sync);
    assert_eq!(c_sync, checkpoints(&d_async));
    let scored: Vec<(u64, Option<f64>)> = e_sync
        .iter()
        .map(|(s, m)| (*s, m.get("lddt_ca").copied()))
        .collect();
    let want = checkpoint::retained_steps(&scored, 1);
    let got: BTreeSet<u64> = c_sync.iter().map(|c| c.0).collect();
    assert_eq!(got, want);
    for (step, m) in &c_sync {
        assert_eq!(m, &e_sync[step], "checkpoint {step} lacks its eval");
    }
}

/// The lDDT target stops an async run at the step where the result is taken (every rank the
/// same), with MLLOG `run_stop` status success; `eval_accuracy` carries the evaluated step.
#[test]
fn eval_async_target_reached_stops_with_success() {
    let mut cfg = toy_config();
    cfg.train.eval_mode = EvalMode::Async;
    cfg.train.max_steps = 30;
    cfg.train.eval_every = 3;
    cfg.train.checkpoint_every = 100;
    cfg.train.target_lddt_ca = Some(0.0); // reached by the first evaluation (step 3)
    let toy = ToyConfig {
        eval_delay_ms: 50,
        step_delay_ms: 5,
        ..ToyConfig::default()
    };
    let dir = run_dir("target");
    let buf = Buf::default();
    let mut o = options(&dir);
    o.mllog = Some(MlLogger::to_writer(Box::new(buf.clone())));
    let mut t = trainer(&cfg, &toy, o);
    let out = t.run().unwrap();
    let Outcome::TargetReached { step, lddt_ca } = out else {
        panic!("{out:?}");
    };
    // Taken after step 3, at the latest when the next evaluation (step 6) waits for it.
    assert!((3..=6).contains(&step), "stopped at step {step}");
    assert_eq!(out.exit_code(), 0);
    assert_eq!(t.step(), step);
    assert_eq!(t.last_eval().unwrap().0, 3);
    assert_eq!(lddt_ca, t.last_eval().unwrap().1["lddt_ca"]);
    assert!(dir.join(checkpoint::dir_name(step)).is_dir());

    let ev = buf.events();
    let find = |k: &str| {
        ev.iter()
            .filter(|e| e["key"] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    let acc = find("eval_accuracy");
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0]["metadata"]["step"], 3);
    assert_eq!(acc[0]["metadata"]["epoch_num"], 1);
    assert_eq!(acc[0]["value"].as_f64().unwrap(), lddt_ca);
    assert_eq!(find("eval_start").len(), 1);
    assert_eq!(find("eval_stop").len(), 1);
    let stop = find("run_stop");
    assert_eq!(stop.len(), 1);
    assert_eq!(stop[0]["metadata"]["status"], "success");
    assert_eq!(stop[0]["metadata"]["step"], step);
    assert_eq!(ev.last().unwrap()["key"], "run_stop");
}

/// A run that ends (max steps) while an evaluation is in flight waits for it, logs it and
/// records it in the final checkpoint.
#[test]
fn eval_async_run_end_waits_for_the_eval_in_flight() {
    let mut cfg = toy_config();
    cfg.train.eval_mode = EvalMode::Async;
    cfg.train.max_steps = 6;
    cfg.train.eval_every = 3;
    cfg.train.checkpoint_every = 100;
    let toy = ToyConfig {
        eval_delay_ms: 400,
        ..ToyConfig::default()
    };
    let dir = run_dir("inflight");
    let buf = Buf::default();
    let mut o = options(&dir);
    o.mllog = Some(MlLogger::to_writer(Box::new(buf.clone())));
    let mut t = trainer(&cfg, &toy, o);
    let t0 = std::time::Instant::now();
    assert_eq!(t.run().unwrap(), Outcome::Finished { step: 6 });
    // Two evaluations of 0.4 s, the second one started at the last step.
    assert!(t0.elapsed().as_secs_f64() >= 0.8);
    let evals = eval_records(&dir);
    assert_eq!(evals.keys().copied().collect::<Vec<_>>(), vec![3, 6]);
    assert_eq!(t.last_eval().unwrap().0, 6);
    assert_eq!(&t.last_eval().unwrap().1, &evals[&6]);
    let meta = checkpoint::read_meta(&dir.join(checkpoint::dir_name(6))).unwrap();
    assert_eq!(meta.eval, evals[&6]);
    let ev = buf.events();
    let steps: Vec<u64> = ev
        .iter()
        .filter(|e| e["key"] == "eval_accuracy")
        .map(|e| e["metadata"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![3, 6]);
    assert_eq!(ev.last().unwrap()["metadata"]["status"], "aborted");
}

/// Resume stays bitwise exact with asynchronous evaluation, and the evaluations of the resumed run
/// equal those of the straight one.
#[test]
fn eval_async_resume_is_bitwise_exact() {
    let mut cfg = toy_config();
    cfg.train.eval_mode = EvalMode::Async;
    cfg.train.max_steps = 12;
    cfg.train.eval_every = 3;
    cfg.train.checkpoint_every = 5;
    let toy = ToyConfig {
        eval_delay_ms: 20,
        ..ToyConfig::default()
    };
    let straight = run_dir("straight");
    let mut a = trainer(&cfg, &toy, options(&straight));
    a.run().unwrap();
    let split = run_dir("split");
    let mut o = options(&split);
    o.stop_at = Some(5);
    let mut b = trainer(&cfg, &toy, o);
    assert_eq!(b.run().unwrap(), Outcome::Finished { step: 5 });
    drop(b);
    let mut o = options(&split);
    o.resume = Resume::Auto;
    let mut c = trainer(&cfg, &toy, o);
    assert_eq!(c.step(), 5);
    c.run().unwrap();
    assert_eq!(snapshot(&a), snapshot(&c));
    assert_eq!(eval_records(&straight), eval_records(&split));
}

/// A run that died with an evaluation in flight left the checkpoint of that step without metrics
/// (simulated by removing them): the resumed run evaluates that step again, logs it and adds the
/// metrics to the checkpoint.
#[test]
fn eval_async_lost_eval_is_redone_on_resume() {
    let mut cfg = toy_config();
    cfg.train.eval_mode = EvalMode::Async;
    cfg.train.max_steps = 6;
    cfg.train.eval_every = 3;
    cfg.train.checkpoint_every = 3;
    let toy = ToyConfig::default();
    let dir = run_dir("lost");
    trainer(&cfg, &toy, options(&dir)).run().unwrap();
    let ck = dir.join(checkpoint::dir_name(6));
    let want = checkpoint::read_meta(&ck).unwrap().eval;
    assert!(want.contains_key("lddt_ca"));
    // Forget the evaluation of step 6: metadata and log line.
    let mut meta = checkpoint::read_meta(&ck).unwrap();
    meta.eval.clear();
    std::fs::write(
        ck.join(checkpoint::META_FILE),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = metrics_lines(&dir)
        .iter()
        .filter(|v| !(v["kind"] == "eval" && v["step"] == 6))
        .map(|v| v.to_string())
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    assert!(!eval_records(&dir).contains_key(&6));

    let mut t = trainer(&cfg, &toy, options(&dir));
    assert_eq!(t.step(), 6);
    assert_eq!(t.run().unwrap(), Outcome::Finished { step: 6 });
    assert_eq!(eval_records(&dir)[&6], want);
    assert_eq!(checkpoint::read_meta(&ck).unwrap().eval, want);
    assert_eq!(t.last_eval().unwrap(), &(6, want));
}

/// `train.eval_mode` parses (default async); dedicated evaluation ranks need async mode.
#[test]
fn eval_async_config_keys() {
    assert_eq!(Config::default().train.eval_mode, EvalMode::Async);
    let c = Config::load(&[], &["train.eval_mode=\"sync\"".into()]).unwrap();
    assert_eq!(c.train.eval_mode, EvalMode::Sync);
    let err = Config::load(&[], &["train.eval_mode=\"later\"".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("eval_mode"), "{err}");
    // Dedicated evaluation ranks need asynchronous evaluation.
    let err = Config::load(
        &[],
        &[
            "parallel.eval_ranks=1".into(),
            "train.eval_mode=\"sync\"".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("parallel.eval_ranks") && err.contains("async"),
        "{err}"
    );
}
