//! Shared by the criterion benches: which device they run on, and how a run is timed.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use flamingo::backend::Backend;
use flamingo::cli::{with_backend, BackendCommand, RunOptions};

/// `FLAMINGO_BENCH_DEVICE` (default `cpu`; `cuda`, `cuda:N`): the `--device` value the benches run on.
pub fn device() -> String {
    std::env::var("FLAMINGO_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// Runs `bench` on the backend `FLAMINGO_BENCH_DEVICE` names.
pub fn on_device(bench: impl BackendCommand) {
    let opts = RunOptions {
        device: device(),
        threads: None,
    };
    with_backend(&opts, Path::new(""), bench)
        .unwrap_or_else(|e| panic!("FLAMINGO_BENCH_DEVICE={}: {e}", device()));
}

/// Time of `iters` runs of `f`, from a synchronised start to a synchronised end (for criterion's `iter_custom`: on
/// a GPU ops are queued asynchronously, so the clock must wait for the device on both sides).
pub fn timed<B: Backend, T>(b: &B, iters: u64, mut f: impl FnMut() -> T) -> Duration {
    Duration::from_secs_f64(flamingo::perf::bench::time(b, || {
        for _ in 0..iters {
            std::hint::black_box(f());
        }
    }))
}
