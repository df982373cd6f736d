//! Fused CUDA kernels (NVRTC, behind the `cuda` feature) and their plain-candle twins.
