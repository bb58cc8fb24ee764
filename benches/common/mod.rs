//! Shared by the criterion benches: which device they run on, and how a run is timed.
#![allow(dead_code)]

use std::time::Duration;

use flamingo::backend::Backend;
use flamingo::cli::RunOptions;

/// `FLAMINGO_BENCH_DEVICE` (default `cpu`): the `--device` value the benches run on.
pub fn device() -> String {
    std::env::var("FLAMINGO_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The backend `FLAMINGO_BENCH_DEVICE` names (CPU only until the CUDA backend is merged).
pub fn backend() -> flamingo::backend::cpu::CpuBackend {
    let opts = RunOptions {
        device: device(),
        threads: None,
    };
    flamingo::cli::select_cpu_backend(&opts)
        .unwrap_or_else(|e| panic!("FLAMINGO_BENCH_DEVICE: {e}"))
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
