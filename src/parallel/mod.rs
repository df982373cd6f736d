//! Parallel runtime: process topology (MPI bootstrap), and later the communicator backends,
//! data parallelism and DAP.

pub mod ctx;

pub use ctx::{ParallelCtx, TopologySource};
