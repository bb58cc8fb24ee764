//! flamingo: an inference engine for Flamingo-style vision-language models (Hugging Face IDEFICS).
//!
//! Layers, each depending only on those below it:
//! `cli`, `server` (OpenAI HTTP API) -> `perf` (benchmarks, profiling) -> `runtime` (batching engine, paged KV
//! cache, media cache) -> `model` (IDEFICS parts) -> `backend` (ops: CPU oracle, CUDA), with `io` (safetensors,
//! config, tokenizer, image, prompt) feeding them and `nvtx` (ranges for Nsight) beneath them all.

pub mod backend;
pub mod cli;
pub mod error;
pub mod io;
pub mod model;
pub mod nvtx;
pub mod perf;
pub mod runtime;
pub mod server;

pub use error::{Error, Result};
