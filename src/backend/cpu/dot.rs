//! A batch-invariant matrix product on x86-64 with AVX2 and FMA: rows of x against a block of W rows (both
//! row-major over k), 4 rows x 3 columns at a time: each W row read from cache serves 4 rows of x, and the 12
//! independent accumulators (with 3 W registers and 1 x register: all 16 AVX2 registers) cover the FMA latency,
//! which 4 x 2 did not (measured on cpu-mid shapes: 70-94 GFLOP/s with 4 x 2, 166-203 with 4 x 3, 2 threads).
//!
//! Every output element is summed the same way whatever tile computed it: 8 lane sums over k in steps of 8 (fused
//! multiply-adds), the k tail added to lanes in order, then the lanes added pairwise in a fixed tree. A row's result
//! therefore depends only on its values and k, never on how many rows share the call.

/// Whether this CPU can run [`block_product`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r * ld + j] = x[r] . w[j]` for `r < m`, `j < cols`; `x` is `[m, k]`, `w` is `[cols, k]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]); `out` must be valid for writes at `r * ld + j` for every
/// `r < m`, `j < cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_product(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(x.len() >= m * k && w.len() >= cols * k);
    let row = |r: usize| &x[r * k..(r + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(4);
        let mut j = 0;
        while j < cols {
            let cs = (cols - j).min(3);
            macro_rules! tile {
                ($R:literal, $C:literal) => {{
                    let xs: [&[f32]; $R] = std::array::from_fn(|i| row(r + i));
                    let ws: [&[f32]; $C] = std::array::from_fn(|i| wrow(j + i));
                    let t = tile::<$R, $C>(xs, ws, k);
                    for (i, tr) in t.iter().enumerate() {
                        for (c, &v) in tr.iter().enumerate() {
                            // SAFETY: r + i < m and j + c < cols, within the caller's promise.
                            unsafe { *out.add((r + i) * ld + j + c) = v };
                        }
                    }
                }};
            }
            match (rows, cs) {
                (4, 3) => tile!(4, 3),
                (4, 2) => tile!(4, 2),
                (4, _) => tile!(4, 1),
                (3, 3) => tile!(3, 3),
                (3, 2) => tile!(3, 2),
                (3, _) => tile!(3, 1),
                (2, 3) => tile!(2, 3),
                (2, 2) => tile!(2, 2),
                (2, _) => tile!(2, 1),
                (_, 3) => tile!(1, 3),
                (_, 2) => tile!(1, 2),
                _ => tile!(1, 1),
            }
            j += cs;
        }
        r += rows;
    }
}

/// `R x C` dot products of length `k`, each in the fixed order the module doc describes: one 8-lane FMA
/// accumulator per element (AVX2 registers, so the tile stays in registers), then the scalar tail and the lane tree.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tile<const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[f32]; C],
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::{
        __m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    let full = k / 8 * 8;
    // SAFETY: the caller runs with AVX2 and FMA enabled; every load reads 8 floats at `base < full <= len`.
    let acc: [[__m256; C]; R] = unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut base = 0;
        while base < full {
            let wv: [__m256; C] =
                std::array::from_fn(|c| _mm256_loadu_ps(ws[c].as_ptr().add(base)));
            for i in 0..R {
                let xv = _mm256_loadu_ps(xs[i].as_ptr().add(base));
                for c in 0..C {
                    acc[i][c] = _mm256_fmadd_ps(xv, wv[c], acc[i][c]);
                }
            }
            base += 8;
        }
        acc
    };
    std::array::from_fn(|i| {
        std::array::from_fn(|c| {
            let mut lanes = [0f32; 8];
            // SAFETY: an 8-float store into an 8-float array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][c]) };
            for t in full..k {
                lanes[t - full] = xs[i][t].mul_add(ws[c][t], lanes[t - full]);
            }
            ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
        })
    })
}

/// `out[r * ld + c] = sum_kk x[r * k + kk] * wt[kk * cols + c]` for `r < m`, `c < cols`: the product with the
/// right-hand side already transposed (`wt` is `[k, cols]`), for short sums (attention over a head's 64 or 128
/// dims) where [`block_product`]'s per-element lane reduction would cost as much as the sum itself.
///
/// Every element is one chain of fused multiply-adds over `kk` in order, in a vector lane or (for the last
/// `cols % 8` columns) a scalar `mul_add`, which rounds the same: a row's result does not depend on the others.
/// Tiles of 6 rows x 16 columns keep 12 accumulators in registers.
///
/// # Safety
/// As [`block_product`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn broadcast_product(
    x: &[f32],
    m: usize,
    k: usize,
    wt: &[f32],
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(x.len() >= m * k && wt.len() >= k * cols);
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(6);
        macro_rules! strip {
            ($R:literal) => {{
                let xs: [&[f32]; $R] = std::array::from_fn(|i| &x[(r + i) * k..(r + i + 1) * k]);
                // SAFETY: rows r..r + R of the output, within the caller's promise.
                unsafe { strip::<$R>(xs, wt, k, cols, out.add(r * ld), ld) };
            }};
        }
        match rows {
            6 => strip!(6),
            5 => strip!(5),
            4 => strip!(4),
            3 => strip!(3),
            2 => strip!(2),
            _ => strip!(1),
        }
        r += rows;
    }
}

/// `R` rows of [`broadcast_product`]: 16 columns at a time, then 8, then one by one.
///
/// # Safety
/// AVX2 and FMA; `out` valid for `R` rows of `cols` at stride `ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn strip<const R: usize>(
    xs: [&[f32]; R],
    wt: &[f32],
    k: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut c = 0;
    while c + 16 <= cols {
        vectors::<R, 2>(xs, wt, k, cols, c, out, ld);
        c += 16;
    }
    if c + 8 <= cols {
        vectors::<R, 1>(xs, wt, k, cols, c, out, ld);
        c += 8;
    }
    for c in c..cols {
        for (i, xi) in xs.iter().enumerate() {
            let mut s = 0f32;
            for kk in 0..k {
                s = xi[kk].mul_add(wt[kk * cols + c], s);
            }
            // SAFETY: row i < R, column c < cols.
            *out.add(i * ld + c) = s;
        }
    }
}

/// Columns `c .. c + 8V` of `R` rows, `R x V` accumulators.
///
/// # Safety
/// AVX2 and FMA; `c + 8V <= cols`; `out` as for [`strip`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)] // indexed loops over the const-sized tile keep it in registers
unsafe fn vectors<const R: usize, const V: usize>(
    xs: [&[f32]; R],
    wt: &[f32],
    k: usize,
    cols: usize,
    c: usize,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::{
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for kk in 0..k {
        // SAFETY: wt holds k rows of `cols`, and c + 8V <= cols.
        let w = wt.as_ptr().add(kk * cols + c);
        let b: [_; V] = std::array::from_fn(|j| _mm256_loadu_ps(w.add(8 * j)));
        for i in 0..R {
            let a = _mm256_set1_ps(xs[i][kk]);
            for j in 0..V {
                acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            // SAFETY: row i < R, columns c + 8j .. + 8 <= cols.
            _mm256_storeu_ps(out.add(i * ld + c + 8 * j), *a);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 * 1e-3 - 1.0)
            .collect()
    }

    /// Every tile shape and column tail of both products against an f64 reference, and each row equal (bit for
    /// bit) to the same row computed alone.
    #[test]
    fn products_match_f64_and_rows_do_not_depend_on_the_batch() {
        if !available() {
            eprintln!("skipped: no AVX2 and FMA");
            return;
        }
        for (m, k, cols) in [
            (1, 1, 1),
            (7, 13, 9),
            (13, 64, 41),
            (6, 257, 16),
            (5, 8, 24),
            (2, 3, 7),
        ] {
            let x = values(m * k, m);
            let w = values(cols * k, cols); // [cols, k] for block_product, read as [k, cols] by broadcast_product
            type Product = unsafe fn(&[f32], usize, usize, &[f32], usize, *mut f32, usize);
            for (name, product, at) in [
                (
                    "block",
                    block_product as Product,
                    (|c, kk, k, _| c * k + kk) as fn(usize, usize, usize, usize) -> usize,
                ),
                (
                    "broadcast",
                    broadcast_product as Product,
                    |c, kk, _, cols| kk * cols + c,
                ),
            ] {
                let run = |rows: &[f32], m: usize| {
                    let mut out = vec![f32::NAN; m * cols];
                    // SAFETY: AVX2 and FMA checked; `out` is [m, cols].
                    unsafe { product(rows, m, k, &w, cols, out.as_mut_ptr(), cols) };
                    out
                };
                let all = run(&x, m);
                for r in 0..m {
                    let alone = run(&x[r * k..(r + 1) * k], 1);
                    assert_eq!(
                        alone,
                        all[r * cols..(r + 1) * cols],
                        "{name} {m}x{k}x{cols} row {r}"
                    );
                    for c in 0..cols {
                        let want: f64 = (0..k)
                            .map(|kk| x[r * k + kk] as f64 * w[at(c, kk, k, cols)] as f64)
                            .sum();
                        assert!(
                            (all[r * cols + c] as f64 - want).abs() < 1e-4 * k as f64,
                            "{name} {m}x{k}x{cols}"
                        );
                    }
                }
            }
        }
    }
}
