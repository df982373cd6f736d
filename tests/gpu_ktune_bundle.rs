//! Device-round bundle: every GPU suite compiled into one test binary, so a single upload runs them
//! all (`gpu_ktune_bundle --test-threads=1`). Each module is the unchanged suite file; on its own
//! each is also a normal integration test.
#![cfg(feature = "cuda")]

#[path = "gpu_grad_norm.rs"]
mod gpu_grad_norm;
#[path = "gpu_graphs.rs"]
mod gpu_graphs;
#[path = "gpu_kernels.rs"]
mod gpu_kernels;
#[path = "gpu_kernels_elem.rs"]
mod gpu_kernels_elem;
#[path = "gpu_ktune.rs"]
mod gpu_ktune;
#[path = "gpu_manual_backward.rs"]
mod gpu_manual_backward;
#[path = "gpu_permute.rs"]
mod gpu_permute;
#[path = "gpu_row_attention.rs"]
mod gpu_row_attention;
