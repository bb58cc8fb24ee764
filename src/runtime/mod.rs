//! Running requests: the scheduler (host-only plans: admission, chunking, preemption, blocks and slots), the
//! continuous-batching engine that executes them over the caches of `crate::cache`, and single-request generation
//! on top of it.

pub mod engine;
pub mod generate;
pub mod pipeline;
pub mod recorded;
pub mod request;
pub mod scheduler;
pub mod service;
pub mod stream;
