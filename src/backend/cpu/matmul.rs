//! `y = x @ W^T` with W in its stored dtype: the output columns are split into blocks across threads; each block
//! widens its rows of W to f32 (or borrows them in place when W is aligned f32) and multiplies every row of x by it,
//! one row at a time, while the block stays in cache. Peak extra memory is one block of W per thread.
//!
//! Batch invariance: `gemm` sums in a different order depending on how many rows it is given (a single row takes
//! a GEMV path, and the blocking of larger products depends on their size), so a row's result would change with
//! the rows around it. On CPUs with AVX2 and FMA the block product is our own (`dot.rs`), whose summation order per
//! element is fixed; elsewhere `gemm` is called on exactly one row at a time. Either way, over column blocks whose
//! width depends only on `n` and `k`, every row's result is the same whatever the batch
//! (`tests/batch_invariance.rs`).

use gemm::Parallelism;
use rayon::prelude::*;

use super::dot;
use super::weight::CpuWeight;

/// Columns per block: enough blocks to keep every thread busy, few enough that each block's `gemm` is efficient.
fn block_cols(n: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 4);
    // Keep a widened block under ~1 MiB so it stays in L2 while every row of x passes over it.
    let by_cache = ((1 << 20) / (4 * k.max(1))).max(8);
    by_threads.clamp(8, by_cache.max(8)).min(n.max(1))
}

/// An output buffer shared by parallel tasks that each write their own disjoint window of it.
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: each task writes a disjoint set of output elements (every user says which).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `x` is `[m, k]` row-major, `w` is `[n, k]`; returns `[m, n]`.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &CpuWeight) -> Vec<f32> {
    let n = w.rows;
    assert_eq!(w.cols, k, "inner dimensions differ");
    assert_eq!(x.len(), m * k);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let nb = block_cols(n, k);
    let dst = OutPtr(out.as_mut_ptr());
    let stored = w.as_f32();
    let fma = dot::available();
    (0..n.div_ceil(nb)).into_par_iter().for_each(|b| {
        let n0 = b * nb;
        let cols = nb.min(n - n0);
        let widened;
        let rows: &[f32] = match stored {
            Some(all) => &all[n0 * k..(n0 + cols) * k],
            None => {
                let mut buf = vec![0f32; cols * k];
                w.widen_rows(n0, &mut buf);
                widened = buf;
                &widened
            }
        };
        let dst = &dst;
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: `fma` says the CPU has AVX2 and FMA; the output window is rows 0..m, columns n0..n0+cols of
            // the [m, n] output, which no other task writes.
            unsafe { dot::block_product(x, m, k, rows, cols, dst.0.add(n0), n) };
            return;
        }
        for r in 0..m {
            // SAFETY: lhs is row r of x ([1, k]), rhs is W^T viewed through strides (element (kk, j) at
            // j*k + kk), dst is the [1, cols] window at column n0 of row r of the [m, n] output; all in bounds, and
            // no other task writes these columns.
            unsafe {
                gemm::gemm(
                    1,
                    cols,
                    k,
                    dst.0.add(r * n + n0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr().add(r * k),
                    1,
                    k as isize,
                    rows.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    });
    out
}
