//! Running requests: the continuous-batching engine over the caches of `crate::cache`, and single-request
//! generation on top of it.

pub mod engine;
pub mod generate;
pub mod pipeline;
pub mod request;
pub mod service;
pub mod stream;
