//! `y = x @ W^T` with W in its stored dtype: the output columns are split into blocks of whole panels across
//! threads; each block reads W's packed panels (an f32 weight's, packed once: `CpuWeight::f32_panels`) or packs
//! its rows of a 16-bit weight into a per-thread buffer, in their dtype, and multiplies every row of x by them
//! while the block stays in cache (`dot::product`, which widens 16-bit values as it loads them). Extra memory: a
//! packed copy of each f32 weight, one block per thread for 16-bit ones.
//!
//! Batch invariance: on CPUs with AVX2 and FMA (or AVX-512) the product is our own, whose summation order per
//! element is fixed (one chain of fused multiply-adds over k, whatever the tile, the batch or the instruction set);
//! elsewhere `gemm` is called on exactly one row at a time over column blocks whose width depends only on `n` and
//! `k` (`gemm` sums in a different order depending on how many rows it is given). Either way every row's result
//! is the same whatever the batch (`tests/batch_invariance.rs`).

use gemm::Parallelism;
use rayon::prelude::*;

use super::dot::{self, Epilogue, PANEL};
use super::weight::CpuWeight;
use crate::io::safetensors::DType;

/// Panels per block of the product for `m` rows: enough blocks to keep every thread busy, a block small enough to
/// stay in L2 while every row of x passes over it, and at least the panels one tile of so few rows reads at once
/// (8 for a decode step's 1 or 2 rows: see `dot`).
fn block_panels(panels: usize, k: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = panels.div_ceil(threads * 4);
    let by_cache = (512 << 10) / (4 * PANEL * k.max(1));
    let tile = match m {
        1..=2 => 8,
        3..=6 => 4,
        _ => 2,
    };
    by_threads.min(by_cache).max(tile).min(panels)
}

/// Columns per block of the `gemm` fallback: enough blocks for every thread, each under ~1 MiB when widened.
fn block_cols(n: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 4);
    let by_cache = ((1 << 20) / (4 * k.max(1))).max(8);
    by_threads.clamp(8, by_cache.max(8)).min(n.max(1))
}

/// An output buffer shared by parallel tasks that each write their own disjoint window of it.
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: each task writes a disjoint set of output elements (every user says which).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `x` is `[m, k]` row-major, `w` is `[n, k]`; returns `[m, n]`, with `bias[j]` added to column j.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &CpuWeight, bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0f32; m * w.rows];
    matmul_t_into(x, m, k, w, Epilogue { bias, ..Epilogue::default() }, &mut out);
    out
}

/// `out = epilogue(x @ W^T)` for `out` `[m, n]` (`x` `[m, k]` row-major, `w` `[n, k]`): the bias, activation and
/// residual add ([`Epilogue`]) applied as each tile is stored.
pub fn matmul_t_into(x: &[f32], m: usize, k: usize, w: &CpuWeight, epilogue: Epilogue, out: &mut [f32]) {
    let n = w.rows;
    assert_eq!(w.cols, k, "inner dimensions differ");
    assert_eq!(x.len(), m * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = dot::isa() {
        return panel_product(isa, x, m, k, w, epilogue, out);
    }
    let mut sums = vec![0f32; m * n];
    row_by_row_gemm(x, m, k, w, &mut sums);
    sums.par_chunks_mut(n)
        .zip(out.par_chunks_mut(n))
        .for_each(|(row, dst)| dot::finish_row(&epilogue, 0, row, dst));
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// A block of a 16-bit weight packed for the product, reused by every product this thread runs.
    static PACKED_BLOCK: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`matmul_t`] by our tiled product, in blocks of whole panels across threads.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn panel_product(isa: dot::Isa, x: &[f32], m: usize, k: usize, w: &CpuWeight, epilogue: Epilogue, out: &mut [f32]) {
    let f32_panels = w.f32_panels();
    for_each_block(w.rows, k, m, out, |c0, cols, at| {
        let e = Epilogue { bias: epilogue.bias.map(|v| &v[c0..c0 + cols]), ..epilogue };
        if let Some(panels) = f32_panels {
            return at.product(isa, x, m, &dot::Rhs::packed(&panels[c0 * k..], k, cols).with_epilogue(e));
        }
        PACKED_BLOCK.with_borrow_mut(|bits| {
            w.pack_bits16(c0, cols, bits);
            match w.dtype() {
                DType::BF16 => at.product_bits::<half::bf16>(isa, x, m, bits, k, cols, e),
                _ => at.product_bits::<half::f16>(isa, x, m, bits, k, cols, e),
            }
        })
    });
}

/// `out = x @ W^T` for `x` `[m, k]` and W `[n, k]` packed as f32 `panels` ([`dot::pack`]).
#[cfg(target_arch = "x86_64")]
pub fn packed_product(isa: dot::Isa, x: &[f32], m: usize, k: usize, panels: &[f32], n: usize, out: &mut [f32]) {
    for_each_block(n, k, m, out, |c0, cols, at| {
        at.product(isa, x, m, &dot::Rhs::packed(&panels[c0 * k..], k, cols))
    });
}

/// Runs `block(c0, cols, out)` for every block of whole panels of the `[m, n]` output, in parallel.
#[cfg(target_arch = "x86_64")]
fn for_each_block(n: usize, k: usize, m: usize, out: &mut [f32], block: impl Fn(usize, usize, &BlockOut) + Sync) {
    let count = n.div_ceil(PANEL);
    let per_block = block_panels(count, k, m);
    let dst = OutPtr(out.as_mut_ptr());
    (0..count.div_ceil(per_block)).into_par_iter().for_each(|blk| {
        let c0 = blk * per_block * PANEL;
        let cols = (per_block * PANEL).min(n - c0);
        block(c0, cols, &BlockOut { dst: &dst, c0, n });
    });
}

/// Where one block's columns go: columns `c0 ..` of the `[m, n]` output.
#[cfg(target_arch = "x86_64")]
struct BlockOut<'a> {
    dst: &'a OutPtr,
    c0: usize,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl BlockOut<'_> {
    fn product<T: dot::PanelValue>(&self, isa: dot::Isa, x: &[f32], m: usize, b: &dot::Rhs<T>) {
        // SAFETY: the CPU has `isa` (`dot::isa`); the output window is rows 0..m, columns c0..c0+cols of the
        // [m, n] output, which no other block writes.
        unsafe { dot::product(isa, x, m, b, self.dst.0.add(self.c0), self.n) };
    }

    /// [`BlockOut::product`] on a block of 16-bit panels packed as `bits` ([`CpuWeight::pack_bits16`]), read as `T`.
    #[allow(clippy::too_many_arguments)]
    fn product_bits<T: dot::PanelValue + bytemuck::Pod>(
        &self,
        isa: dot::Isa,
        x: &[f32],
        m: usize,
        bits: &[u16],
        k: usize,
        cols: usize,
        epilogue: Epilogue,
    ) {
        let b = dot::Rhs::packed(bytemuck::cast_slice::<u16, T>(bits), k, cols).with_epilogue(epilogue);
        self.product(isa, x, m, &b);
    }
}

/// [`matmul_t`] by `gemm`, one row at a time (CPUs without AVX2 and FMA).
fn row_by_row_gemm(x: &[f32], m: usize, k: usize, w: &CpuWeight, out: &mut [f32]) {
    let n = w.rows;
    let nb = block_cols(n, k);
    let dst = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(nb)).into_par_iter().for_each(|b| {
        let n0 = b * nb;
        let cols = nb.min(n - n0);
        let mut rows = vec![0f32; cols * k];
        w.widen_rows(n0, &mut rows);
        let dst = &dst;
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
}
