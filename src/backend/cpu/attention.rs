//! Softmax attention on the CPU: one query row at a time (rows in parallel), every head, f32 scores with the maximum
//! subtracted. The three attention ops differ only in which key rows a query sees, so they share `attend`.

use rayon::prelude::*;

/// `out = sum_j softmax_j(scale * q . k_j) v_j` over `n` keys given by `key(j) -> (k_j, v_j)`.
pub fn attend<'a>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
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
        let s = scale * lane_dot(q, k);
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
