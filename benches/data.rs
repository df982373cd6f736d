//! Data pipeline benchmarks: featurising one crop-256 sample from the HDF5 cache (clustering +
//! masking, one core), prefetch throughput with N workers, mmCIF parsing throughput.
//!
//! `FERROFOLD_DATA=/path/to/proteins cargo bench --bench data`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrofold::config::{Config, LoaderConfig, LoaderOrder};
use ferrofold::data::cache::CacheReader;
use ferrofold::data::command::prepare;
use ferrofold::data::loader::{Dataset, Loader, LoaderState};
use ferrofold::data::manifest::manifest_from_index;
use ferrofold::data::structure::parse_mmcif;
use ferrofold::data::transforms::{build_sample, FeatureConfig};

fn data_root() -> PathBuf {
    Config::default().data.resolved_data_root()
}

fn cache() -> PathBuf {
    let out = std::env::temp_dir().join(format!("ff-bench-{}.h5", std::process::id()));
    let root = data_root();
    let m =
        manifest_from_index(&root).expect("index.json under the data root (set FERROFOLD_DATA)");
    prepare(&root, &m.entries, &out, None, false).expect("prepare");
    out
}

fn benches(c: &mut Criterion) {
    let path = cache();
    let cfg = Config::default(); // crop 256, 128 clusters, 1024 extra, 4 recycling copies
    let f = FeatureConfig::from_config(&cfg);
    let reader = CacheReader::open(&path).expect("cache");
    let mut g = c.benchmark_group("featurise");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for id in ["1k1a_A", "3u8v_A"] {
        let mut k = 0u64;
        g.bench_function(format!("{id}_crop256_4recycles_from_cache"), |b| {
            b.iter(|| {
                k += 1;
                let input = reader.read(id).expect("read").input;
                build_sample(&input, &f, k).expect("sample")
            })
        });
    }
    g.finish();

    let ds = Arc::new(Dataset::from_cache(&path, &cfg.data, None).expect("dataset"));
    let mut g = c.benchmark_group("prefetch");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for workers in [1usize, 2] {
        let n = 16u64;
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{workers}_workers_{n}_samples"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let lc = LoaderConfig {
                        num_workers: workers,
                        prefetch: 2 * workers,
                        order: LoaderOrder::NonBlocking,
                    };
                    let t = Instant::now();
                    let mut l = Loader::for_dataset(
                        ds.clone(),
                        &cfg.data,
                        f.clone(),
                        &lc,
                        &LoaderState::default(),
                    );
                    for _ in 0..n {
                        l.next_sample().expect("sample");
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("mmcif_parse");
    g.sample_size(20);
    for (id, chain) in [("5ugo", "A"), ("4zey", "A")] {
        let p = data_root().join(format!("train/{id}.cif"));
        let text = std::fs::read_to_string(&p).expect("cif");
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(id, |b| {
            b.iter(|| parse_mmcif(&text, &p, id, chain).expect("parse"))
        });
    }
    g.finish();
    std::fs::remove_file(&path).ok();
}

criterion_group!(data, benches);
criterion_main!(data);
