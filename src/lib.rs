//! flamingo: an inference engine for Flamingo-style vision-language models (Hugging Face IDEFICS).
//!
//! Layers, top first: a module uses modules of its own layer and of the layers below it, never one above, and no
//! files depend on each other in a cycle (`tests/architecture.rs` reads every path the sources name to check both):
//! - `cli`: the `flamingo` command line;
//! - `server`: the OpenAI-compatible HTTP API;
//! - `perf`: benchmarks, profiling, roofline floors;
//! - `runtime`: the continuous-batching engine, the loaded pipeline, requests and their outputs;
//! - `model`: the model families (`model::idefics`), the layers they share, the sampling rules;
//! - `cache`: the paged KV cache and the media cache, which models read and write and the runtime manages;
//! - `backend`: the ops, on the CPU (the test oracle and a real fallback) and on CUDA;
//! - `io`: files in: safetensors, configs, tokenizer, images, prompts;
//! - `error`, `nvtx`: the error type, and ranges for Nsight, beneath them all.

pub mod backend;
pub mod cache;
pub mod cli;
pub mod error;
pub mod io;
pub mod model;
pub mod nvtx;
pub mod perf;
pub mod runtime;
pub mod server;

pub use error::{Error, Result};
