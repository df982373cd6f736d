//! MLPerf (HPC) logging: the one place that prints `:::MLLOG` lines.
//!
//! Line format (as produced by the `mlperf_logging` package and read by its compliance checker):
//! `:::MLLOG {"namespace": "", "time_ms": 1700000000000, "event_type": "POINT_IN_TIME", "key":
//! "global_batch_size", "value": 128, "metadata": {"file": "src/train/trainer.rs", "lineno": 42}}`.
//! `file`/`lineno` are the caller's (`#[track_caller]`). Only rank 0 logs (the logger is created
//! disabled elsewhere).

use std::io::Write;
use std::sync::Mutex;

use serde_json::{json, Value};

/// MLPerf logging keys used by ferrofold (names as in `mlperf_logging.mllog.constants`).
pub mod keys {
    // Intervals.
    pub const INIT_START: &str = "init_start";
    pub const INIT_STOP: &str = "init_stop";
    pub const RUN_START: &str = "run_start";
    pub const RUN_STOP: &str = "run_stop";
    pub const EPOCH_START: &str = "epoch_start";
    pub const EPOCH_STOP: &str = "epoch_stop";
    pub const BLOCK_START: &str = "block_start";
    pub const BLOCK_STOP: &str = "block_stop";
    pub const EVAL_START: &str = "eval_start";
    pub const EVAL_STOP: &str = "eval_stop";
    // Results.
    pub const EVAL_ACCURACY: &str = "eval_accuracy";
    pub const TRAIN_LOSS: &str = "train_loss";
    pub const TRACKED_STATS: &str = "tracked_stats";
    // Submission information.
    pub const SUBMISSION_BENCHMARK: &str = "submission_benchmark";
    pub const SUBMISSION_ORG: &str = "submission_org";
    pub const SUBMISSION_DIVISION: &str = "submission_division";
    pub const SUBMISSION_STATUS: &str = "submission_status";
    pub const SUBMISSION_PLATFORM: &str = "submission_platform";
    pub const CACHE_CLEAR: &str = "cache_clear";
    // Hyper-parameters.
    pub const SEED: &str = "seed";
    pub const GLOBAL_BATCH_SIZE: &str = "global_batch_size";
    pub const TRAIN_SAMPLES: &str = "train_samples";
    pub const EVAL_SAMPLES: &str = "eval_samples";
    pub const OPT_NAME: &str = "opt_name";
    pub const OPT_BASE_LR: &str = "opt_base_learning_rate";
    pub const OPT_LR_WARMUP_STEPS: &str = "opt_learning_rate_warmup_steps";
    pub const OPT_LR_DECAY_START_STEP: &str = "opt_learning_rate_decay_start_step";
    pub const OPT_LR_DECAY_STEPS: &str = "opt_learning_rate_decay_steps";
    pub const OPT_LR_DECAY_FACTOR: &str = "opt_learning_rate_decay_factor";
    pub const OPT_ADAM_BETA_1: &str = "opt_adam_beta_1";
    pub const OPT_ADAM_BETA_2: &str = "opt_adam_beta_2";
    pub const OPT_ADAM_EPSILON: &str = "opt_adam_epsilon";
    pub const GRADIENT_CLIPPING: &str = "gradient_clipping";
    pub const OPT_GRADIENT_CLIP_NORM: &str = "opt_gradient_clip_norm";
    pub const GRADIENT_ACCUMULATION_STEPS: &str = "gradient_accumulation_steps";
    pub const MODEL_PARAMETERS_COUNT: &str = "model_parameters_count";
    pub const NUMBER_OF_RANKS: &str = "number_of_ranks";
    pub const NUMBER_OF_NODES: &str = "number_of_nodes";
    // Status values for `run_stop`.
    pub const SUCCESS: &str = "success";
    pub const ABORTED: &str = "aborted";
}

/// MLPerf event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    IntervalStart,
    IntervalEnd,
    PointInTime,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::IntervalStart => "INTERVAL_START",
            EventType::IntervalEnd => "INTERVAL_END",
            EventType::PointInTime => "POINT_IN_TIME",
        }
    }
}

/// Writes `:::MLLOG` lines (or nothing when disabled).
pub struct MlLogger {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for MlLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlLogger")
            .field("enabled", &self.sink.is_some())
            .finish()
    }
}

impl MlLogger {
    /// Log to stdout when `enabled` (rank 0 with `log.mllog = "on"`).
    pub fn stdout(enabled: bool) -> Self {
        if enabled {
            Self::to_writer(Box::new(std::io::stdout()))
        } else {
            Self::disabled()
        }
    }

    /// Log into any writer (tests, files).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Some(Mutex::new(w)),
        }
    }

    pub fn disabled() -> Self {
        Self { sink: None }
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// `INTERVAL_START` event.
    #[track_caller]
    pub fn start(&self, key: &str, value: Value, metadata: Value) {
        self.log(EventType::IntervalStart, key, value, metadata);
    }

    /// `INTERVAL_END` event.
    #[track_caller]
    pub fn end(&self, key: &str, value: Value, metadata: Value) {
        self.log(EventType::IntervalEnd, key, value, metadata);
    }

    /// `POINT_IN_TIME` event.
    #[track_caller]
    pub fn event(&self, key: &str, value: Value, metadata: Value) {
        self.log(EventType::PointInTime, key, value, metadata);
    }

    #[track_caller]
    fn log(&self, kind: EventType, key: &str, value: Value, metadata: Value) {
        let Some(sink) = &self.sink else { return };
        let loc = std::panic::Location::caller();
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = format_line(
            time_ms,
            kind,
            key,
            &value,
            &metadata,
            loc.file(),
            loc.line(),
        );
        if let Ok(mut w) = sink.lock() {
            // Logging must never stop training: write errors are ignored.
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    }
}

/// One `:::MLLOG` line. `metadata` (an object, or null) is extended with `file` and `lineno`.
pub fn format_line(
    time_ms: u128,
    kind: EventType,
    key: &str,
    value: &Value,
    metadata: &Value,
    file: &str,
    lineno: u32,
) -> String {
    let mut meta = serde_json::Map::new();
    meta.insert("file".into(), json!(file));
    meta.insert("lineno".into(), json!(lineno));
    if let Value::Object(extra) = metadata {
        for (k, v) in extra {
            meta.insert(k.clone(), v.clone());
        }
    }
    let mut s = String::from(":::MLLOG {\"namespace\": \"\", \"time_ms\": ");
    s.push_str(&time_ms.to_string());
    s.push_str(", \"event_type\": ");
    write_py_json(&mut s, &json!(kind.as_str()));
    s.push_str(", \"key\": ");
    write_py_json(&mut s, &json!(key));
    s.push_str(", \"value\": ");
    write_py_json(&mut s, value);
    s.push_str(", \"metadata\": ");
    write_py_json(&mut s, &Value::Object(meta));
    s.push('}');
    s
}

/// JSON with Python `json.dumps` default separators (`", "`, `": "`), like `mlperf_logging`.
fn write_py_json(out: &mut String, v: &Value) {
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json(out, x);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(out, x);
            }
            out.push('}');
        }
        // Scalars: serde_json's text (non-finite floats are already null in a Value).
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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

    #[test]
    fn line_format() {
        let l = format_line(
            1234,
            EventType::PointInTime,
            keys::GLOBAL_BATCH_SIZE,
            &json!(128),
            &Value::Null,
            "src/x.rs",
            7,
        );
        assert_eq!(
            l,
            ":::MLLOG {\"namespace\": \"\", \"time_ms\": 1234, \"event_type\": \"POINT_IN_TIME\", \
             \"key\": \"global_batch_size\", \"value\": 128, \"metadata\": {\"file\": \"src/x.rs\", \
             \"lineno\": 7}}"
        );
        let l = format_line(
            5,
            EventType::IntervalEnd,
            keys::RUN_STOP,
            &Value::Null,
            &json!({"status": "success"}),
            "f.rs",
            1,
        );
        let body: Value = serde_json::from_str(l.strip_prefix(":::MLLOG ").unwrap()).unwrap();
        assert_eq!(body["event_type"], "INTERVAL_END");
        assert_eq!(body["key"], "run_stop");
        assert_eq!(body["value"], Value::Null);
        assert_eq!(body["metadata"]["status"], "success");
        assert_eq!(body["metadata"]["lineno"], 1);
    }

    #[test]
    fn logger_records_caller_and_disabled_is_silent() {
        let buf = Buf::default();
        let log = MlLogger::to_writer(Box::new(buf.clone()));
        log.start(keys::INIT_START, Value::Null, Value::Null);
        let line_no = line!() - 1;
        log.event(keys::EVAL_ACCURACY, json!(0.8), json!({"epoch_num": 3}));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0][":::MLLOG ".len()..]).unwrap();
        assert_eq!(first["event_type"], "INTERVAL_START");
        assert!(first["metadata"]["file"]
            .as_str()
            .unwrap()
            .ends_with("mllog.rs"));
        assert_eq!(first["metadata"]["lineno"], line_no);
        assert!(first["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
        let second: Value = serde_json::from_str(&lines[1][":::MLLOG ".len()..]).unwrap();
        assert_eq!(second["value"], 0.8);
        assert_eq!(second["metadata"]["epoch_num"], 3);

        let off = MlLogger::disabled();
        off.event(keys::SEED, json!(1), Value::Null); // no panic, no output
        assert!(!off.enabled());
    }
}
