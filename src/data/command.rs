//! `ferrofold data …`: build manifests, prepare and inspect the HDF5 feature cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::{Args, Subcommand};
use rayon::prelude::*;

use super::cache::{CacheReader, CacheWriter, CachedChain, ChainMeta, CACHE_FORMAT_VERSION};
use super::dataset::load_entry;
use super::manifest::{manifest_from_index, sha256_file, Entry, Manifest};
use crate::config::DataConfig;
use crate::error::{Error, Result};

/// `ferrofold data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// Data subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write a sample manifest (TOML) from the data root's index.json.
    Manifest {
        /// Data root (default: $FERROFOLD_DATA, else ../shared/data/proteins).
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
        /// Output manifest.
        #[arg(long, value_name = "FILE", default_value = "datasets/sample.toml")]
        out: PathBuf,
    },
    /// Check that every file of a manifest exists (and matches its sha256).
    Check {
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
        #[arg(long, value_name = "FILE", default_value = "datasets/sample.toml")]
        manifest: PathBuf,
    },
    /// Parse every chain of a manifest (in parallel) into an HDF5 feature cache.
    Prepare {
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
        #[arg(long, value_name = "FILE", default_value = "datasets/sample.toml")]
        manifest: PathBuf,
        /// Output HDF5 file.
        #[arg(long, value_name = "FILE.h5")]
        out: PathBuf,
        /// Parser threads (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Summarise an HDF5 feature cache.
    Inspect {
        /// The cache file.
        file: PathBuf,
        /// Print one line per chain.
        #[arg(long)]
        chains: bool,
    },
}

fn data_root(arg: &Option<PathBuf>) -> PathBuf {
    DataConfig {
        data_root: arg.clone(),
        ..Default::default()
    }
    .resolved_data_root()
}

/// Run a data subcommand.
pub fn run(args: &DataArgs) -> Result<()> {
    match &args.command {
        DataCommand::Manifest { data_root: r, out } => {
            let root = data_root(r);
            let m = manifest_from_index(&root)?;
            m.check(&root, true)?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            m.save(out)?;
            println!(
                "wrote {} ({} chains, checksums verified)",
                out.display(),
                m.entries.len()
            );
            Ok(())
        }
        DataCommand::Check {
            data_root: r,
            manifest,
        } => {
            let root = data_root(r);
            let entries = Manifest::load(manifest)?.check(&root, true)?;
            println!(
                "{}: {} chains, all files present under {}",
                manifest.display(),
                entries.len(),
                root.display()
            );
            Ok(())
        }
        DataCommand::Prepare {
            data_root: r,
            manifest,
            out,
            jobs,
            quiet,
        } => {
            let root = data_root(r);
            let entries = Manifest::load(manifest)?.check(&root, false)?;
            let stats = prepare(&root, &entries, out, *jobs, !*quiet)?;
            println!(
                "wrote {}: {} chains ({} skipped) in {:.1} s",
                out.display(),
                stats.written,
                stats.failed.len(),
                stats.seconds
            );
            for f in &stats.failed {
                eprintln!("skipped: {f}");
            }
            Ok(())
        }
        DataCommand::Inspect { file, chains } => inspect(file, *chains),
    }
}

/// Result of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareStats {
    pub written: usize,
    /// One message per chain that failed to parse.
    pub failed: Vec<String>,
    pub seconds: f64,
}

fn cached_chain(root: &Path, e: &Entry) -> Result<CachedChain> {
    let (chain, input) = load_entry(root, e)?;
    let mut sources = vec![(
        e.structure.path.display().to_string(),
        sha256_file(&root.join(&e.structure.path))?,
    )];
    for f in super::dataset::entry_alignments(root, e)? {
        sources.push((
            f.path.display().to_string(),
            super::manifest::sha256_hex(f.text.as_bytes()),
        ));
    }
    let meta = ChainMeta {
        id: e.id.clone(),
        chain: e.chain.clone(),
        split: e.split.clone(),
        sequence: chain.sequence.clone(),
        resolution: chain.resolution,
        release_date: chain.release_date.clone(),
        method: chain.method.clone(),
        cluster_size: e.cluster_size,
        resolved_residues: chain.resolved_residues(),
        sources,
    };
    Ok(CachedChain {
        meta,
        input,
        author_residue_number: chain.author_residue_number,
    })
}

/// Parse `entries` in parallel (rayon, `jobs` threads) and write them to `out`. Chains that fail
/// are skipped and reported.
pub fn prepare(
    root: &Path,
    entries: &[Entry],
    out: &Path,
    jobs: Option<usize>,
    progress: bool,
) -> Result<PrepareStats> {
    let t0 = std::time::Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.unwrap_or(0))
        .build()
        .map_err(|e| Error::Msg(format!("thread pool: {e}")))?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(entries.len() as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chains {elapsed} {msg}")
        {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let done = AtomicUsize::new(0);
    let parsed: Vec<Result<CachedChain>> = pool.install(|| {
        entries
            .par_iter()
            .map(|e| {
                let r = cached_chain(root, e);
                done.fetch_add(1, Ordering::Relaxed);
                bar.inc(1);
                r
            })
            .collect()
    });
    bar.finish_and_clear();
    let mut w = CacheWriter::create(out)?;
    let mut stats = PrepareStats {
        written: 0,
        failed: Vec::new(),
        seconds: 0.0,
    };
    for (e, r) in entries.iter().zip(parsed) {
        match r {
            Ok(c) => {
                w.add(&c)?;
                stats.written += 1;
            }
            Err(err) => {
                tracing::warn!("skipping {}: {err}", e.id);
                stats.failed.push(format!("{}: {err}", e.id));
            }
        }
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    if stats.written == 0 && !entries.is_empty() {
        return Err(Error::Data {
            what: out.display().to_string(),
            msg: format!("no chain could be parsed:\n  {}", stats.failed.join("\n  ")),
        });
    }
    Ok(stats)
}

/// Print a cache summary.
pub fn inspect(file: &Path, per_chain: bool) -> Result<()> {
    let r = CacheReader::open(file)?;
    let mut total_res = 0;
    let mut total_rows = 0;
    let mut lines = Vec::new();
    for id in r.ids() {
        let c = r.read(id)?;
        total_res += c.input.len();
        total_rows += c.input.msa.rows;
        lines.push(format!(
            "{:<10} {:<5} L={:<4} resolved={:<4} msa={:<5} res={:<6} {} {}",
            id,
            c.meta.split,
            c.input.len(),
            c.meta.resolved_residues,
            c.input.msa.rows,
            c.meta.resolution.map_or("-".into(), |v| format!("{v:.2}")),
            c.meta.release_date.as_deref().unwrap_or("-"),
            c.meta
                .sources
                .first()
                .map_or("", |s| &s.1[..12.min(s.1.len())]),
        ));
    }
    println!("{}: format version {CACHE_FORMAT_VERSION}", file.display());
    println!(
        "{} chains, {} residues, {} MSA rows",
        r.ids().len(),
        total_res,
        total_rows
    );
    if per_chain {
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}
