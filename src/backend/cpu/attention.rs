//! Softmax attention on the CPU, f32 scores with the maximum subtracted.
//!
//! Where every query row sees the same keys (the vision encoder), [`full`] runs each head as two register-tiled
//! products (`dot::product`): scores `Q K^T`, the softmax, then `P V`. Elsewhere (causal, paged and cross-attention, whose rows see
//! different keys) one query row at a time ([`per_row_head`] and [`attend`]). Either way a row's result is summed
//! in an order fixed by its own keys, whatever rows share the call.

use rayon::prelude::*;

use super::activation::exp_negative;
use super::dot;
use super::matmul::OutPtr;

/// Query rows per task of [`full`]: enough tasks to feed every thread, each long enough to reuse a head's keys.
const ROWS_PER_TASK: usize = 64;

/// Non-causal attention of `q` `[rows, heads * d]` over `n` keys, `key(j)` giving key row `j` and value row `j`
/// (each `heads * d` wide), with tiled products; `None` on CPUs without AVX2 and FMA (then [`per_row_head`]
/// serves).
pub fn full<'a>(
    q: &[f32],
    rows: usize,
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
    heads: usize,
    scale: f32,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = dot::isa() {
        return Some(tiled(isa, q, rows, n, key, heads, scale));
    }
    None
}

/// [`full`] on AVX2 and FMA or AVX-512.
#[cfg(target_arch = "x86_64")]
fn tiled<'a>(
    isa: dot::Isa,
    q: &[f32],
    rows: usize,
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
    heads: usize,
    scale: f32,
) -> Vec<f32> {
    let width = q.len() / rows.max(1);
    let d = width / heads;
    let key = &key;
    // Each head's keys transposed to [d, n] and values as [n, d]: the right-hand sides of the two products.
    let operands: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let cols = h * d..(h + 1) * d;
            let kt = cols
                .clone()
                .flat_map(|c| (0..n).map(move |j| key(j).0[c]))
                .collect();
            let vh = (0..n)
                .flat_map(|j| &key(j).1[cols.clone()])
                .copied()
                .collect();
            (kt, vh)
        })
        .collect();
    let mut out = vec![0f32; rows * width];
    let dst = OutPtr(out.as_mut_ptr());
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    (0..heads * tasks).into_par_iter().for_each(|t| {
        let (h, r0) = (t / tasks, t % tasks * ROWS_PER_TASK);
        let m = ROWS_PER_TASK.min(rows - r0);
        let qh: Vec<f32> = (r0..r0 + m)
            .flat_map(|r| &q[r * width + h * d..r * width + (h + 1) * d])
            .copied()
            .collect();
        let (kt, vh) = &operands[h];
        let mut p = vec![0f32; m * n];
        let dst = &dst;
        // SAFETY: the CPU has `isa`; `p` is [m, n]; the output window is rows r0..r0+m, columns of head h, which
        // no other task writes.
        unsafe {
            dot::product(isa, &qh, m, &dot::Rhs::row_major(kt, d, n), p.as_mut_ptr(), n);
            p.chunks_mut(n).for_each(|row| softmax(row, scale));
            dot::product(isa, &p, m, &dot::Rhs::row_major(vh, n, d), dst.0.add(r0 * width + h * d), width);
        }
    });
    out
}

/// `row = softmax(scale * row)`, in place, maximum subtracted, with the vectorised exponential
/// (`activation::exp_negative`): AVX2 lanes where the CPU has them, the same operations (and bits) elsewhere.
fn softmax(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { softmax_avx2(row, scale) };
    }
    softmax_lanes(row, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32) {
    softmax_lanes(row, scale);
}

#[inline(always)]
fn softmax_lanes(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(scale * s));
    row.iter_mut().for_each(|s| *s = exp_negative(scale * *s - max));
    let sum: f32 = row.iter().sum();
    row.iter_mut().for_each(|s| *s /= sum);
}

/// `out = sum_j softmax_j(scale * q . k_j) v_j` over `n` keys given by `key(j) -> (k_j, v_j)`.
pub fn attend<'a>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_scored(n, key, |_, k| scale * lane_dot(q, k), scores, out)
}

/// [`attend`] with `bias(j)` added to key `j`'s scaled score (ALiBi).
pub fn attend_biased<'a>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    bias: impl Fn(usize) -> f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_scored(n, key, |j, k| scale * lane_dot(q, k) + bias(j), scores, out)
}

/// The softmax-weighted sum of the values, key `j` scored `score(j, k_j)`.
fn attend_scored<'a>(
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    score: impl Fn(usize, &[f32]) -> f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    out.fill(0.0);
    if n == 0 {
        return;
    }
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..n {
        let (k, _) = key(j);
        let s = score(j, k);
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for (j, &p) in scores.iter().enumerate() {
        let (_, v) = key(j);
        let p = p / sum;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}

/// `a . b` summed in 8 lanes (so the compiler can vectorise it; a plain running sum must stay sequential), the
/// lanes then added in a fixed tree: the same order for every row, whatever else is computed with it.
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in at.iter().zip(bt).enumerate() {
        lanes[l] += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
}

/// Runs `row_fn(row_index, head, q_head, out_head, scores)` for every query row and head, rows in parallel, and
/// returns the `[rows, heads * d]` output.
pub fn per_row_head(
    q: &[f32],
    rows: usize,
    heads: usize,
    d: usize,
    row_fn: impl Fn(usize, usize, &[f32], &mut [f32], &mut Vec<f32>) + Sync,
) -> Vec<f32> {
    let width = heads * d;
    let mut out = vec![0f32; rows * width];
    out.par_chunks_mut(width)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, out_row)| {
            for h in 0..heads {
                let qh = &q[i * width + h * d..i * width + (h + 1) * d];
                row_fn(i, h, qh, &mut out_row[h * d..(h + 1) * d], scores);
            }
        });
    out
}
