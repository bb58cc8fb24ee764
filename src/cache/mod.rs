//! The device caches models read and the runtime manages: the paged self-attention KV cache and the media cache
//! (every live image's cross-attention K/V). Models write and read them; the runtime sizes them, hands out their
//! blocks and slots, and frees them when requests end.

pub mod kv_cache;
pub mod media_cache;
