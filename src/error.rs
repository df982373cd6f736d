//! The library's error type. One enum, one variant family per boundary (config, I/O, data, model,
//! communication, checkpoints); every variant names the file, key or rank it is about so that a
//! user sees one clear line. `main.rs` wraps it in `anyhow` for context.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration key is unknown, has the wrong type, or fails validation.
    #[error("config error in {source_name}: {key}: {msg}")]
    Config {
        /// Which layer the problem came from: a file path, `--set`, or `resolved`.
        source_name: String,
        /// Dotted key path, e.g. `optim.lr`.
        key: String,
        msg: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// Malformed content in a file (structure, MSA, manifest, checkpoint metadata...).
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: PathBuf,
        /// 1-based line number; 0 when unknown.
        line: usize,
        msg: String,
    },

    /// A sample or dataset problem that is not a parse error (wrong chain, empty MSA, mismatch).
    #[error("data error ({what}): {msg}")]
    Data { what: String, msg: String },

    /// Shape or configuration mismatch inside the model.
    #[error("model error: {0}")]
    Model(String),

    /// Loss/metric computation problem (e.g. a non-finite term).
    #[error("loss error: {0}")]
    Loss(String),

    /// Checkpoint missing, corrupt, or incompatible.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// Communication / MPI / NCCL failure.
    #[error("communication error (rank {rank}): {msg}")]
    Comm { rank: usize, msg: String },

    /// Training-loop level errors.
    #[error("training error: {0}")]
    Train(String),

    /// Tensor library errors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// HDF5 errors, with the file they are about.
    #[error("hdf5 {path}: {msg}")]
    Hdf5 { path: PathBuf, msg: String },

    /// Anything a caller wants to report with context.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// Convenience constructor for I/O errors with the path attached.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// Convenience constructor for parse errors.
    pub fn parse(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Parse {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }

    /// Convenience constructor for config errors.
    pub fn config(
        source_name: impl Into<String>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            source_name: source_name.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}
