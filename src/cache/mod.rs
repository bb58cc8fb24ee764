//! The device caches models read and the runtime manages: the paged self-attention KV cache and the media cache
//! (every live image's cross-attention K/V). Models write and read them; the runtime's scheduler hands out their
//! blocks and slots from host-only pools (`pool`), so what is allocated can be planned and tested without a model.

pub mod content;
pub mod kv_cache;
pub mod media_cache;
pub mod pool;
