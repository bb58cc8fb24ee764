//! Shared by the criterion benches: which device they run on, and how a run is timed.
#![allow(dead_code)]

use std::time::Duration;

use flamingo::backend::Backend;
use flamingo::cli::options::{with_backend, BackendCommand, RunOptions};
use flamingo::runtime::pipeline::ModelPaths;

/// `FLAMINGO_BENCH_DEVICE` (default `cpu`; `cuda`, `cuda:N`): the `--device` value the benches run on.
pub fn device() -> String {
    std::env::var("FLAMINGO_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// `FLAMINGO_BENCH_DTYPE` (default `bf16`; `f16`): the CUDA backend's activation type, as `--dtype`.
pub fn dtype() -> String {
    std::env::var("FLAMINGO_BENCH_DTYPE").unwrap_or_else(|_| "bf16".into())
}

/// Runs `bench` on the backend `FLAMINGO_BENCH_DEVICE` and `FLAMINGO_BENCH_DTYPE` name.
pub fn on_device(bench: impl BackendCommand) {
    let opts = RunOptions {
        device: device(),
        dtype: dtype()
            .parse()
            .unwrap_or_else(|e| panic!("FLAMINGO_BENCH_DTYPE: {e}")),
        threads: None,
        skip_weight_check: false,
    };
    with_backend(&opts, &ModelPaths::default(), bench)
        .unwrap_or_else(|e| panic!("FLAMINGO_BENCH_DEVICE={}: {e}", device()));
}

/// Time of `iters` runs of `f` on the backend's own clock (for criterion's `iter_custom`): on a GPU, CUDA events
/// recorded on the stream before and after the loop, so the time is the device's, not the host's launch loop; on
/// the CPU the host clock.
pub fn timed<B: Backend, T>(b: &B, iters: u64, mut f: impl FnMut() -> T) -> Duration {
    b.synchronize();
    let start = b.timestamp();
    for _ in 0..iters {
        std::hint::black_box(f());
    }
    let end = b.timestamp();
    Duration::from_secs_f64(b.elapsed_us(&start, &end) * 1e-6)
}
