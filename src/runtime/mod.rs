//! Running requests: the paged KV cache, the media cache, the continuous-batching engine, and single-request
//! generation on top of it.

pub mod engine;
pub mod generate;
pub mod kv_cache;
pub mod media_cache;
pub mod service;
pub mod stream;
