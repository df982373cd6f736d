//! ferrofold: train AlphaFold2-style protein structure models at scale.
//!
//! Layout: [`config`] (layered TOML), [`parallel`] (MPI bootstrap, communicators, DP, DAP),
//! [`model`] (AF2 modules), [`loss`], [`data`], [`geometry`], [`train`], [`kernels`].

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod geometry;
pub mod kernels;
pub mod logging;
pub mod loss;
pub mod model;
pub mod parallel;
pub mod train;

pub use error::{Error, Result};

/// Crate version (goes into checkpoints, logs and `ferrofold info`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Cargo features this binary was built with.
pub fn enabled_features() -> Vec<&'static str> {
    let mut f = vec!["cpu"];
    if cfg!(feature = "cuda") {
        f.push("cuda");
        f.push("nccl");
    }
    f
}
