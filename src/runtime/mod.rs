//! Running requests: the per-sequence KV cache and the generation loop.

pub mod generate;
pub mod kv_cache;
