//! The CPU's measured ceilings: DRAM bandwidth from a large multi-threaded copy, and f32 FLOP/s from a large matrix
//! product with every thread: the faster of the `gemm` crate at full parallelism and our own packed-panel product
//! (`matmul::packed_product`, which on AVX-512 outruns `gemm`), so that the ceiling is the best this machine is
//! known to reach and no op can look better than it is.

use std::time::Instant;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::{dot, matmul};
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
    let (a, b) = gemm_operands();
    let (crate_flops, ours_flops) = (gemm_flops(threads, &a, &b), packed_flops(&a, &b));
    Ceilings {
        copy_bytes_per_s: copy_bandwidth(),
        matmul_flops_per_s: crate_flops.max(ours_flops),
        method: format!(
            "copy of {} MiB across {threads} threads (read + write bytes), best of {COPY_REPEATS}; \
             f32 {GEMM_N}^3 on {threads} threads, best of {GEMM_REPEATS}, the faster of the gemm crate \
             ({:.0} GFLOP/s) and our packed product ({:.0} GFLOP/s)",
            COPY_BYTES >> 20,
            crate_flops / 1e9,
            ours_flops / 1e9,
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

/// Two non-zero `GEMM_N` x `GEMM_N` matrices.
fn gemm_operands() -> (Vec<f32>, Vec<f32>) {
    let n = GEMM_N;
    let a = (0..n * n).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let b = (0..n * n).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect();
    (a, b)
}

/// Best of a few `GEMM_N`³ products by our packed-panel product (`a b^T`, b packed once, untimed), in FLOP/s;
/// 0 on CPUs without it.
fn packed_flops(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = dot::isa() {
        let n = GEMM_N;
        let mut panels = vec![0f32; n.div_ceil(dot::PANEL) * n * dot::PANEL];
        dot::pack(|j, kk| b[j * n + kk], n, n, &mut panels);
        let mut c = vec![0f32; n * n];
        let seconds = best_seconds(GEMM_REPEATS, || matmul::packed_product(isa, a, n, n, &panels, n, &mut c));
        std::hint::black_box(&c);
        return 2.0 * (n * n * n) as f64 / seconds;
    }
    0.0
}

/// Best of a few `GEMM_N`³ products by the `gemm` crate, in FLOP/s.
fn gemm_flops(threads: usize, a: &[f32], b: &[f32]) -> f64 {
    let n = GEMM_N;
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
