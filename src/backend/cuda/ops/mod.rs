//! The CUDA backend's ops: one file per kernel file of `kernels/`, named as it is, each function named as the
//! `Backend` method it implements (`cross_attention` in `cross_attention.rs` launches `cross_attention_d*_bf16`
//! of `kernels/cross_attention.cu`). Every launch builds its kernel's typed argument struct (`launchers.rs`).

pub(super) mod activation;
pub(super) mod attention;
pub(super) mod copy;
pub(super) mod cross_attention;
pub(super) mod embedding;
pub(super) mod gemm;
pub(super) mod norm;
pub(super) mod resampler_attention;
pub(super) mod rope;
pub(super) mod sampling;
