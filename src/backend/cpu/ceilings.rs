//! The CPU's measured ceilings: DRAM bandwidth from a large multi-threaded copy, and f32 FLOP/s from a large matrix
//! product with every thread (the `gemm` crate at full parallelism, not the backend's batch-invariant row-by-row
//! product, so the ceiling is the hardware's and not our kernel's).

use std::time::Instant;

use rayon::prelude::*;

use crate::backend::Ceilings;
use crate::error::{Error, Result};

/// Far larger than any last-level cache, so the copy streams from DRAM.
const COPY_BYTES: usize = 256 << 20;
const COPY_REPEATS: usize = 5;
/// Square f32 product: large enough to be compute-bound, small enough to take ~0.1 s on two cores.
const GEMM_N: usize = 1536;
const GEMM_REPEATS: usize = 3;

pub fn measure() -> Ceilings {
    let threads = rayon::current_num_threads();
    Ceilings {
        copy_bytes_per_s: copy_bandwidth(),
        matmul_flops_per_s: gemm_flops(threads),
        method: format!(
            "copy of {} MiB across {threads} threads (read + write bytes), best of {COPY_REPEATS}; \
             f32 gemm {GEMM_N}^3 on {threads} threads, best of {GEMM_REPEATS}",
            COPY_BYTES >> 20
        ),
    }
}

/// Best of a few parallel copies, in bytes read plus written per second.
fn copy_bandwidth() -> f64 {
    let n = COPY_BYTES / 4;
    // Non-zero data, and both buffers touched before timing so page faults stay out of the numbers.
    let src: Vec<f32> = (0..n).map(|i| (i % 251) as f32 + 1.0).collect();
    let mut dst = vec![1f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4);
    best_seconds(COPY_REPEATS, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    })
    .recip()
        * (2 * COPY_BYTES) as f64
}

/// Best of a few `GEMM_N`³ products, in FLOP/s.
fn gemm_flops(threads: usize) -> f64 {
    let n = GEMM_N;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i % 89) as f32 - 44.0) * 0.01)
        .collect();
    let mut c = vec![0f32; n * n];
    let seconds = best_seconds(GEMM_REPEATS, || {
        // SAFETY: a, b, c are n x n row-major (row stride n, column stride 1), all in bounds.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
    });
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / seconds
}

/// The fastest of `repeats` runs of `f`, after one untimed warm-up run.
fn best_seconds(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `MemAvailable` from `/proc/meminfo`: what the kernel can give without swapping.
pub fn available_memory() -> Result<usize> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map(|kib| kib << 10)
        .ok_or_else(|| Error::Invalid(format!("{path} has no readable MemAvailable line")))
}
