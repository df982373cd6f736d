//! Non-blocking prefetching loader (ScaleFold-style) and the training dataset/sampler.
//!
//! Worker threads build samples ahead into a bounded buffer. In [`LoaderOrder::NonBlocking`] mode the
//! trainer takes the lowest-index sample that is ready, so one slow sample never stalls a step; in
//! [`LoaderOrder::Deterministic`] mode it takes samples in strict index order. A sample's content
//! depends only on its index (seeded streams), so both modes yield the same samples, only the
//! order can differ. Bad samples are skipped, counted and logged. The loader position
//! ([`LoaderState`]) is serialisable for checkpoints: resuming skips every consumed index.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::cache::CacheReader;
use super::dataset::{filter_reason, load_entry, sample_weight};
use super::manifest::{Entry, Manifest};
use super::rng::{Purpose, Rng};
use super::sample::Sample;
use super::transforms::{build_sample, FeatureConfig, ProteinInput};
use crate::config::{DataConfig, LoaderConfig, LoaderOrder};
use crate::error::{Error, Result};

/// Where chains come from.
enum Source {
    Cache(CacheReader),
    Files { root: PathBuf },
}

/// One usable chain.
#[derive(Debug, Clone)]
pub struct DatasetItem {
    pub id: String,
    pub weight: f64,
    entry: Option<Entry>,
}

/// The chains of a split after filtering, with OpenFold sampling weights.
pub struct Dataset {
    source: Source,
    items: Vec<DatasetItem>,
    cumulative: Vec<f64>,
    /// `(id, reason)` of chains removed by the filters.
    pub filtered: Vec<(String, String)>,
}

impl Dataset {
    fn finish(
        source: Source,
        items: Vec<DatasetItem>,
        filtered: Vec<(String, String)>,
    ) -> Result<Dataset> {
        if items.is_empty() {
            return Err(Error::Data {
                what: "dataset".into(),
                msg: format!("no usable chains ({} filtered out)", filtered.len()),
            });
        }
        let mut acc = 0.0;
        let cumulative = items
            .iter()
            .map(|i| {
                acc += i.weight;
                acc
            })
            .collect();
        Ok(Dataset {
            source,
            items,
            cumulative,
            filtered,
        })
    }

    /// Chains of `split` (all if None) from an HDF5 cache, filtered as OpenFold.
    pub fn from_cache(path: &Path, cfg: &DataConfig, split: Option<&str>) -> Result<Dataset> {
        let reader = CacheReader::open(path)?;
        let mut items = Vec::new();
        let mut filtered = Vec::new();
        for id in reader.ids() {
            let meta = reader.meta(id)?;
            if split.is_some_and(|s| s != meta.split) {
                continue;
            }
            let aa: Vec<u8> = meta
                .sequence
                .bytes()
                .map(super::alphabet::aatype_of_letter)
                .collect();
            match filter_reason(cfg, &aa, meta.resolution.unwrap_or(0.0)) {
                Some(r) => filtered.push((id.clone(), r)),
                None => items.push(DatasetItem {
                    id: id.clone(),
                    weight: sample_weight(aa.len(), meta.cluster_size),
                    entry: None,
                }),
            }
        }
        Dataset::finish(Source::Cache(reader), items, filtered)
    }

    /// Chains of `split` from a manifest's text files under `root` (parsed on demand by workers).
    pub fn from_manifest(
        root: &Path,
        manifest: &Manifest,
        cfg: &DataConfig,
        split: Option<&str>,
    ) -> Result<Dataset> {
        let entries = manifest.check(root, false)?;
        let mut items = Vec::new();
        let mut filtered = Vec::new();
        for e in entries {
            if split.is_some_and(|s| s != e.split) {
                continue;
            }
            if let Some(seq) = &e.sequence {
                let aa: Vec<u8> = seq.bytes().map(super::alphabet::aatype_of_letter).collect();
                if let Some(r) = filter_reason(cfg, &aa, e.resolution.unwrap_or(0.0) as f32) {
                    filtered.push((e.id.clone(), r));
                    continue;
                }
            }
            let len = e
                .seq_len
                .or(e.sequence.as_ref().map(String::len))
                .unwrap_or(256);
            items.push(DatasetItem {
                id: e.id.clone(),
                weight: sample_weight(len, e.cluster_size),
                entry: Some(e),
            });
        }
        Dataset::finish(
            Source::Files {
                root: root.to_path_buf(),
            },
            items,
            filtered,
        )
    }

    /// The dataset a run configuration names: `data.cache` (HDF5) when set, else `data.manifest`
    /// under the resolved data root.
    pub fn from_config(cfg: &DataConfig, split: Option<&str>) -> Result<Dataset> {
        match &cfg.cache {
            Some(cache) => Dataset::from_cache(cache, cfg, split),
            None => {
                let root = cfg.resolved_data_root();
                let manifest = Manifest::load(&cfg.manifest)?;
                Dataset::from_manifest(&root, &manifest, cfg, split)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[DatasetItem] {
        &self.items
    }

    /// Full-length inputs of item `i`.
    pub fn load(&self, i: usize, cfg: &DataConfig) -> Result<ProteinInput> {
        let item = self
            .items
            .get(i)
            .ok_or_else(|| Error::Msg(format!("dataset index {i} out of range")))?;
        let mut input = match (&self.source, &item.entry) {
            (Source::Cache(r), _) => r.read(&item.id)?.input,
            (Source::Files { root }, Some(e)) => load_entry(root, e)?.1,
            (Source::Files { .. }, None) => {
                return Err(Error::Msg(format!("{}: no manifest entry", item.id)))
            }
        };
        // `max_msa_seqs`: keep the first rows of the merged MSA (query first).
        let m = &mut input.msa;
        if m.rows > cfg.max_msa_seqs.max(1) {
            m.rows = cfg.max_msa_seqs.max(1);
            m.tokens.truncate(m.rows * m.width);
            m.deletions.truncate(m.rows * m.width);
        }
        if let Some(r) = filter_reason(cfg, &input.aatype, input.resolution) {
            return Err(Error::Data {
                what: item.id.clone(),
                msg: format!("filtered: {r}"),
            });
        }
        Ok(input)
    }

    /// The item sampled for stream index `k`: a weighted draw (with replacement) from the
    /// `(seed, k, 0, Sampler)` stream.
    pub fn pick(&self, seed: u64, k: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = Rng::stream(seed, k, 0, Purpose::Sampler).next_f64() * total;
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.items.len() - 1)
    }
}

/// Serialisable loader position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Every index below this has been consumed (or skipped).
    pub watermark: u64,
    /// Consumed indices at or above the watermark (non-blocking mode consumes out of order).
    pub consumed_above: Vec<u64>,
    /// Samples handed to the trainer.
    pub served: u64,
    /// Bad samples skipped.
    pub skipped: u64,
}

impl LoaderState {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Msg(e.to_string()))
    }

    /// As a JSON value (for `Task::data_state` in checkpoints).
    pub fn to_value(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self).map_err(|e| Error::Msg(e.to_string()))
    }

    /// From a JSON value written by [`LoaderState::to_value`].
    pub fn from_value(v: &serde_json::Value) -> Result<LoaderState> {
        serde_json::from_value(v.clone()).map_err(|e| Error::Checkpoint {
            path: PathBuf::from("loader_state"),
            msg: e.to_string(),
        })
    }

    pub fn from_json(s: &str) -> Result<LoaderState> {
        serde_json::from_str(s).map_err(|e| Error::Checkpoint {
            path: PathBuf::from("loader_state"),
            msg: e.to_string(),
        })
    }
}

type BuildFn = dyn Fn(u64) -> Result<Sample> + Send + Sync;

struct Inner {
    next_job: u64,
    in_flight: usize,
    ready: BTreeMap<u64, std::result::Result<Sample, String>>,
    consumed: BTreeSet<u64>,
    watermark: u64,
    served: u64,
    skipped: u64,
    shutdown: bool,
    /// Skipped samples' messages (most recent last, capped).
    errors: Vec<String>,
}

impl Inner {
    fn mark_consumed(&mut self, k: u64) {
        self.consumed.insert(k);
        while self.consumed.remove(&self.watermark) {
            self.watermark += 1;
        }
    }

    /// Next job index not yet consumed.
    fn take_job(&mut self) -> u64 {
        while self.consumed.contains(&self.next_job) {
            self.next_job += 1;
        }
        let k = self.next_job;
        self.next_job += 1;
        k
    }
}

struct Shared {
    inner: Mutex<Inner>,
    cv_ready: Condvar,
    cv_space: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A worker that panicked while holding the lock leaves consistent data (plain counters).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The prefetching loader.
pub struct Loader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    order: LoaderOrder,
    /// Give up after this many consecutive bad samples.
    max_consecutive_failures: u64,
}

impl Loader {
    /// Start `num_workers` threads building `build(k)` for k = 0, 1, 2, … (skipping indices
    /// consumed in `state`), at most `prefetch` samples ahead.
    pub fn start(
        num_workers: usize,
        prefetch: usize,
        order: LoaderOrder,
        state: &LoaderState,
        build: Arc<BuildFn>,
    ) -> Loader {
        let mut consumed: BTreeSet<u64> = state.consumed_above.iter().copied().collect();
        consumed.retain(|&k| k >= state.watermark);
        let inner = Inner {
            next_job: state.watermark,
            in_flight: 0,
            ready: BTreeMap::new(),
            consumed,
            watermark: state.watermark,
            served: state.served,
            skipped: state.skipped,
            shutdown: false,
            errors: Vec::new(),
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            cv_ready: Condvar::new(),
            cv_space: Condvar::new(),
            capacity: prefetch.max(1),
        });
        let workers = (0..num_workers.max(1))
            .map(|w| {
                let shared = Arc::clone(&shared);
                let build = Arc::clone(&build);
                std::thread::Builder::new()
                    .name(format!("ff-loader-{w}"))
                    .spawn(move || worker(&shared, &*build))
            })
            .filter_map(|r| r.ok())
            .collect();
        Loader {
            shared,
            workers,
            order,
            max_consecutive_failures: 1000,
        }
    }

    /// A loader over a dataset: index `k` samples item `dataset.pick(seed, k)` and featurises it
    /// with stream index `k`.
    pub fn for_dataset(
        dataset: Arc<Dataset>,
        data: &DataConfig,
        features: FeatureConfig,
        lc: &LoaderConfig,
        state: &LoaderState,
    ) -> Loader {
        Loader::for_dataset_sharded(dataset, data, features, lc, state, 0, 1)
    }

    /// [`Loader::for_dataset`] for data-parallel rank `rank` of `world`: local job `k` uses the
    /// global sample index `k·world + rank`, so ranks never draw the same stream.
    #[allow(clippy::too_many_arguments)]
    pub fn for_dataset_sharded(
        dataset: Arc<Dataset>,
        data: &DataConfig,
        features: FeatureConfig,
        lc: &LoaderConfig,
        state: &LoaderState,
        rank: usize,
        world: usize,
    ) -> Loader {
        let data = data.clone();
        let (rank, world) = (rank as u64, world.max(1) as u64);
        let build = move |k: u64| -> Result<Sample> {
            let g = k * world + rank;
            let i = dataset.pick(features.seed, g);
            let input = dataset.load(i, &data)?;
            build_sample(&input, &features, g)
        };
        Loader::start(
            lc.num_workers,
            lc.prefetch,
            lc.order,
            state,
            Arc::new(build),
        )
    }

    /// The next sample (see the module docs for the order). Errors only when
    /// `max_consecutive_failures` samples in a row were bad or the workers are gone.
    pub fn next_sample(&mut self) -> Result<Sample> {
        let mut failures = 0u64;
        let mut g = self.shared.lock();
        loop {
            let key = match self.order {
                LoaderOrder::NonBlocking => g.ready.keys().next().copied(),
                LoaderOrder::Deterministic => {
                    let want = g.watermark;
                    g.ready.contains_key(&want).then_some(want)
                }
            };
            let Some(k) = key else {
                if self.workers.is_empty() || self.workers.iter().all(|w| w.is_finished()) {
                    return Err(Error::Data {
                        what: "loader".into(),
                        msg: "all loader workers have stopped".into(),
                    });
                }
                g = self
                    .shared
                    .cv_ready
                    .wait(g)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let r = g.ready.remove(&k);
            g.mark_consumed(k);
            self.shared.cv_space.notify_all();
            match r {
                Some(Ok(s)) => {
                    g.served += 1;
                    return Ok(s);
                }
                Some(Err(msg)) => {
                    g.skipped += 1;
                    tracing::warn!("loader: skipping sample {k}: {msg}");
                    if g.errors.len() >= 100 {
                        g.errors.remove(0);
                    }
                    g.errors.push(format!("{k}: {msg}"));
                    failures += 1;
                    if failures >= self.max_consecutive_failures {
                        return Err(Error::Data {
                            what: "loader".into(),
                            msg: format!("{failures} consecutive bad samples; last: {msg}"),
                        });
                    }
                }
                None => {}
            }
        }
    }

    /// Current position (for checkpoints).
    pub fn state(&self) -> LoaderState {
        let g = self.shared.lock();
        LoaderState {
            watermark: g.watermark,
            consumed_above: g.consumed.iter().copied().collect(),
            served: g.served,
            skipped: g.skipped,
        }
    }

    /// Messages of the most recent skipped samples.
    pub fn skipped_errors(&self) -> Vec<String> {
        self.shared.lock().errors.clone()
    }
}

fn worker(shared: &Shared, build: &BuildFn) {
    loop {
        let k = {
            let mut g = shared.lock();
            while !g.shutdown && g.in_flight + g.ready.len() >= shared.capacity {
                g = shared.cv_space.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if g.shutdown {
                return;
            }
            g.in_flight += 1;
            g.take_job()
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build(k)))
            .unwrap_or_else(|_| Err(Error::Msg("sample builder panicked".into())))
            .map_err(|e| e.to_string());
        let mut g = shared.lock();
        g.in_flight -= 1;
        if g.shutdown {
            return;
        }
        g.ready.insert(k, result);
        shared.cv_ready.notify_all();
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv_space.notify_all();
        self.shared.cv_ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn fake(k: u64) -> Result<Sample> {
        Ok(Sample {
            id: format!("s{k}"),
            index: k,
            features: BTreeMap::new(),
        })
    }

    #[test]
    fn deterministic_order_is_strict() {
        let build = Arc::new(|k: u64| {
            // Later indices finish first.
            std::thread::sleep(Duration::from_millis(if k.is_multiple_of(3) {
                15
            } else {
                1
            }));
            fake(k)
        });
        let mut l = Loader::start(
            3,
            4,
            LoaderOrder::Deterministic,
            &LoaderState::default(),
            build,
        );
        let got: Vec<u64> = (0..12).map(|_| l.next_sample().unwrap().index).collect();
        assert_eq!(got, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn slow_sample_does_not_stall_nonblocking() {
        let build = Arc::new(|k: u64| {
            if k == 0 {
                std::thread::sleep(Duration::from_millis(400));
            }
            fake(k)
        });
        let mut l = Loader::start(
            2,
            4,
            LoaderOrder::NonBlocking,
            &LoaderState::default(),
            build,
        );
        let t = Instant::now();
        let first = l.next_sample().unwrap().index;
        assert_ne!(first, 0);
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        let mut seen: Vec<u64> = vec![first];
        for _ in 0..5 {
            seen.push(l.next_sample().unwrap().index);
        }
        // Every index is served once; 0 arrives once it is ready.
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn bad_samples_are_skipped_and_counted() {
        let build = Arc::new(|k: u64| {
            if k % 4 == 1 {
                Err(Error::parse("bad.cif", 7, "truncated"))
            } else {
                fake(k)
            }
        });
        let mut l = Loader::start(
            2,
            3,
            LoaderOrder::Deterministic,
            &LoaderState::default(),
            build,
        );
        let got: Vec<u64> = (0..6).map(|_| l.next_sample().unwrap().index).collect();
        assert_eq!(got, vec![0, 2, 3, 4, 6, 7]);
        let st = l.state();
        assert_eq!((st.served, st.skipped), (6, 2));
        assert!(l.skipped_errors()[0].contains("bad.cif:7"));
    }

    #[test]
    fn state_roundtrip_resumes_without_repeats() {
        let build = Arc::new(|k: u64| {
            std::thread::sleep(Duration::from_millis(if k == 2 { 50 } else { 1 }));
            fake(k)
        });
        let mut l = Loader::start(
            2,
            4,
            LoaderOrder::NonBlocking,
            &LoaderState::default(),
            build.clone(),
        );
        let mut first: Vec<u64> = (0..5).map(|_| l.next_sample().unwrap().index).collect();
        let st = LoaderState::from_json(&l.state().to_json().unwrap()).unwrap();
        assert_eq!(
            LoaderState::from_value(&st.to_value().unwrap()).unwrap(),
            st
        );
        drop(l);
        assert_eq!(st.served, 5);
        let mut l2 = Loader::start(2, 4, LoaderOrder::Deterministic, &st, build);
        let second: Vec<u64> = (0..5).map(|_| l2.next_sample().unwrap().index).collect();
        first.extend(&second);
        let mut all = first.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10, "{first:?}");
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
