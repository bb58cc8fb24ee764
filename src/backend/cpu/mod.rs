//! The CPU backend: f32 compute, multi-threaded with rayon, weights left memory-mapped in their stored dtype.
//! It is the reference every other backend is tested against, and a working fallback. This file is one cohesive
//! thing: the `Backend` implementation, op by op (the heavy kernels live in `attention`, `matmul`, `dot`).

mod activation;
mod attention;
mod ceilings;
mod dot;
mod matmul;
pub mod sampling;
mod weight;

pub use weight::CpuWeight;

use rayon::prelude::*;

use super::{nothing_to_sample, Backend, Ceilings, DecodeShape, RowSampling, Sampled, StepLayout};
use self::dot::Epilogue;
use crate::error::{Error, Result};
use crate::io::config::{Activation, Alibi, RopeFrequencies};
use crate::io::safetensors::{DType, TensorRef};

/// A row-major `[rows, cols]` f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CpuBackend {
    /// Only `new` makes one: it sets up the allocator first.
    _private: (),
}

impl CpuBackend {
    pub fn new() -> Self {
        keep_freed_buffers();
        CpuBackend { _private: () }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// Every op returns a fresh tensor, and glibc's malloc hands large freed buffers back to the kernel (a chunk over
/// its mmap threshold is unmapped on free; a heap's top over its trim threshold is released), so the next op's
/// output faults its pages in again and the kernel zeroes them: a fifth of a cpu-mid prefill's time on this
/// machine (`flamingo profile`, 2 threads: 294-331 ms, 227-243 ms with this). Serving keeps every buffer for
/// reuse instead, as PyTorch's caching allocator does: buffers up to 32 MiB come from the heap (glibc's largest
/// allowed threshold), and freed heap memory is kept. The cost is the peak's memory staying mapped.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets allocator parameters; it is called before this backend allocates, and a
            // value glibc refuses leaves the parameter as it was (the return value only reports that).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

impl CpuTensor {
    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

fn tensor(data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
    debug_assert_eq!(data.len(), rows * cols);
    CpuTensor { data, rows, cols }
}

/// `f(group, out_group)` over every `width`-wide group of `x`'s rows, groups in parallel.
fn map_groups(x: &CpuTensor, width: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> CpuTensor {
    assert_eq!(
        x.cols % width,
        0,
        "row width {} is not a multiple of the norm width {width}",
        x.cols
    );
    let mut out = vec![0f32; x.data.len()];
    out.par_chunks_mut(width)
        .zip(x.data.par_chunks(width))
        .for_each(|(o, g)| f(g, o));
    tensor(out, x.rows, x.cols)
}

/// Head `h` (width `d`) of row `row` of K and of V.
/// Key and value of query head `h` at `row`: with grouped-query attention (`k` has fewer heads than the queries'
/// `heads`) query head `h` reads kv head `h / (heads / kv_heads)`, transformers' `repeat_kv`.
fn head_of_row<'a>(
    k: &'a CpuTensor,
    v: &'a CpuTensor,
    row: usize,
    (h, heads): (usize, usize),
    d: usize,
) -> (&'a [f32], &'a [f32]) {
    let kv_heads = k.cols / d;
    let o = row * k.cols + h / (heads / kv_heads) * d;
    (&k.data[o..o + d], &v.data[o..o + d])
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// A step layout with every row's sequence, position and KV slot worked out once.
pub struct CpuLayout {
    step: StepLayout,
    /// Per row: `(sequence, position)`.
    rows: Vec<(usize, usize)>,
    image_of_row: Vec<i32>,
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Layout = CpuLayout;
    type Timestamp = std::time::Instant;

    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn synchronize(&self) {}

    /// Ops have finished when they return: the host clock is the device's.
    fn timestamp(&self) -> std::time::Instant {
        std::time::Instant::now()
    }

    fn elapsed_us(&self, from: &std::time::Instant, to: &std::time::Instant) -> f64 {
        to.saturating_duration_since(*from).as_secs_f64() * 1e6
    }

    fn free_memory(&self) -> Result<usize> {
        ceilings::available_memory()
    }

    fn measure_ceilings(&self) -> Ceilings {
        ceilings::measure()
    }

    /// Weights stay in their stored dtype, widened inside the ops.
    fn weight_width(&self, stored: DType) -> usize {
        stored.size()
    }

    fn activation_width(&self) -> usize {
        std::mem::size_of::<f32>()
    }

    /// A matrix in f32 is packed for the product here, at load, so that no request pays for it.
    fn load_weight(&self, t: &TensorRef) -> Result<CpuWeight> {
        let w = CpuWeight::new(t.clone());
        if t.shape.len() >= 2 {
            w.f32_panels();
        }
        Ok(w)
    }

    fn from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(
            data.len(),
            rows * cols,
            "host data does not fill [{rows}, {cols}]"
        );
        tensor(data, rows, cols)
    }

    fn to_host(&self, t: &CpuTensor) -> Vec<f32> {
        t.data.clone()
    }

    fn dims(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight_to_tensor(&self, w: &CpuWeight) -> CpuTensor {
        tensor(w.to_vec(), w.rows, w.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        tensor(vec![0.0; rows * cols], rows, cols)
    }

    fn slice_rows(&self, t: &CpuTensor, start: usize, len: usize) -> CpuTensor {
        tensor(
            t.data[start * t.cols..(start + len) * t.cols].to_vec(),
            len,
            t.cols,
        )
    }

    fn concat_rows(&self, a: &CpuTensor, b: &CpuTensor) -> CpuTensor {
        assert_eq!(a.cols, b.cols);
        let mut data = a.data.clone();
        data.extend_from_slice(&b.data);
        tensor(data, a.rows + b.rows, a.cols)
    }

    fn concat_cols(&self, a: &CpuTensor, b: &CpuTensor) -> CpuTensor {
        assert_eq!(a.rows, b.rows);
        let mut data = Vec::with_capacity(a.data.len() + b.data.len());
        for r in 0..a.rows {
            data.extend_from_slice(&a.data[r * a.cols..(r + 1) * a.cols]);
            data.extend_from_slice(&b.data[r * b.cols..(r + 1) * b.cols]);
        }
        tensor(data, a.rows, a.cols + b.cols)
    }

    fn write_rows(&self, dst: &mut CpuTensor, row: usize, src: &CpuTensor) {
        assert_eq!(dst.cols, src.cols);
        assert!(
            row + src.rows <= dst.rows,
            "writing rows {row}..{} of {}",
            row + src.rows,
            dst.rows
        );
        dst.data[row * dst.cols..(row + src.rows) * dst.cols].copy_from_slice(&src.data);
    }

    fn gather_rows(&self, t: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * t.cols);
        for &r in rows {
            data.extend_from_slice(&t.data[r * t.cols..(r + 1) * t.cols]);
        }
        tensor(data, rows.len(), t.cols)
    }

    fn layout(&self, step: &StepLayout) -> CpuLayout {
        CpuLayout {
            rows: step.row_positions().collect(),
            image_of_row: step
                .seqs
                .iter()
                .flat_map(|s| s.image_of_row.iter().copied())
                .collect(),
            step: step.clone(),
        }
    }

    fn write_kv(&self, pool: &mut CpuTensor, layout: &CpuLayout, rows: &CpuTensor) {
        assert_eq!(pool.cols, rows.cols);
        assert_eq!(
            rows.rows,
            layout.rows.len(),
            "K/V rows do not match the step"
        );
        let w = rows.cols;
        for (i, &(seq, pos)) in layout.rows.iter().enumerate() {
            let slot = layout.step.slot(seq, pos);
            pool.data[slot * w..(slot + 1) * w].copy_from_slice(&rows.data[i * w..(i + 1) * w]);
        }
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &CpuWeight,
        extra: Option<&CpuWeight>,
    ) -> Result<CpuTensor> {
        let d = table.cols;
        let extra_rows = extra.map_or(0, |e| e.rows);
        let mut out = vec![0f32; ids.len() * d];
        for (row, &id) in out.chunks_mut(d).zip(ids) {
            let id = id as usize;
            match extra {
                _ if id < table.rows => table.widen_rows(id, row),
                Some(e) if id < table.rows + extra_rows => e.widen_rows(id - table.rows, row),
                _ => {
                    return Err(Error::Invalid(format!(
                        "token id {id} is beyond the {} embedding rows",
                        table.rows + extra_rows
                    )))
                }
            }
        }
        Ok(tensor(out, ids.len(), d))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
        let bias = bias.map(CpuWeight::to_vec);
        let y = matmul::matmul_t(&x.data, x.rows, x.cols, w, bias.as_deref());
        tensor(y, x.rows, w.rows)
    }

    fn linear_activate(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>, act: Activation) -> CpuTensor {
        let bias = bias.map(CpuWeight::to_vec);
        let epilogue = Epilogue { bias: bias.as_deref(), activation: Some(act), accumulate: false };
        let mut y = vec![0f32; x.rows * w.rows];
        matmul::matmul_t_into(&x.data, x.rows, x.cols, w, epilogue, &mut y);
        tensor(y, x.rows, w.rows)
    }

    fn linear_add(&self, acc: &mut CpuTensor, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) {
        assert_eq!((acc.rows, acc.cols), (x.rows, w.rows), "a residual for the product's output");
        let bias = bias.map(CpuWeight::to_vec);
        let epilogue = Epilogue { bias: bias.as_deref(), activation: None, accumulate: true };
        matmul::matmul_t_into(&x.data, x.rows, x.cols, w, epilogue, &mut acc.data);
    }

    fn add_assign(&self, acc: &mut CpuTensor, x: &CpuTensor) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols));
        acc.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
    }

    fn add_gated(&self, acc: &mut CpuTensor, x: &CpuTensor, alpha: &CpuWeight) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols));
        let gate: Vec<f32> = alpha.to_vec().iter().map(|a| a.tanh()).collect();
        assert!(
            gate.len() == 1 || gate.len() == acc.cols,
            "gate of {} values for {} columns",
            gate.len(),
            acc.cols
        );
        for (a_row, x_row) in acc.data.chunks_mut(acc.cols).zip(x.data.chunks(x.cols)) {
            for (c, (a, b)) in a_row.iter_mut().zip(x_row).enumerate() {
                *a += gate[if gate.len() == 1 { 0 } else { c }] * b;
            }
        }
    }

    fn layer_norm(&self, x: &CpuTensor, w: &CpuWeight, b: &CpuWeight, eps: f32) -> CpuTensor {
        let (w, b) = (w.to_vec(), b.to_vec());
        map_groups(x, w.len(), |g, o| {
            let n = g.len() as f64;
            let mean = g.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, (o, &v)) in o.iter_mut().zip(g).enumerate() {
                *o = ((v as f64 - mean) * inv) as f32 * w[i] + b[i];
            }
        })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> CpuTensor {
        let w = w.to_vec();
        map_groups(x, w.len(), |g, o| {
            let ms = g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / g.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for (i, (o, &v)) in o.iter_mut().zip(g).enumerate() {
                *o = w[i] * (v * inv);
            }
        })
    }

    fn activate(&self, x: &mut CpuTensor, act: Activation) {
        activation::activate_in_place(&mut x.data, act);
    }

    fn swiglu(&self, gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols));
        let data = gate
            .data
            .par_iter()
            .zip(&up.data)
            .map(|(&g, &u)| silu(g) * u)
            .collect();
        tensor(data, gate.rows, gate.cols)
    }

    fn rope(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        head_dim: usize,
        layout: &CpuLayout,
        freqs: &RopeFrequencies,
    ) {
        rope_rotate(q, head_dim, layout, freqs);
        rope_rotate(k, head_dim, layout, freqs);
    }

    fn attention(&self, q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, heads: usize) -> CpuTensor {
        let d = q.cols / heads;
        let scale = (d as f32).powf(-0.5);
        let blocked = (k.cols == q.cols).then(|| attention::full(
            &q.data,
            q.rows,
            k.rows,
            |j| (k.row(j), v.row(j)),
            heads,
            scale,
        )).flatten();
        let out = blocked.unwrap_or_else(|| {
            attention::per_row_head(&q.data, q.rows, heads, d, |_, h, qh, out, scores| {
                attention::attend(
                    qh,
                    k.rows,
                    |j| head_of_row(k, v, j, (h, heads), d),
                    scale,
                    scores,
                    out,
                );
            })
        });
        tensor(out, q.rows, q.cols)
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        k_pool: &CpuTensor,
        v_pool: &CpuTensor,
        heads: usize,
        layout: &CpuLayout,
        alibi: Option<&Alibi>,
    ) -> CpuTensor {
        assert_eq!(
            layout.rows.len(),
            q.rows,
            "query rows do not match the step"
        );
        let d = q.cols / heads;
        let scale = (d as f32).powf(-0.5);
        let slopes: Option<Vec<f32>> = alibi.map(|a| (0..heads).map(|h| a.slope(h) as f32).collect());
        let out = attention::per_row_head(&q.data, q.rows, heads, d, |i, h, qh, out, scores| {
            let (seq, pos) = layout.rows[i];
            let key = |j: usize| head_of_row(k_pool, v_pool, layout.step.slot(seq, j), (h, heads), d);
            match &slopes {
                None => attention::attend(qh, pos + 1, key, scale, scores, out),
                Some(slopes) => {
                    let bias = |j: usize| slopes[h] * (j as f32 - pos as f32);
                    attention::attend_biased(qh, pos + 1, key, scale, bias, scores, out)
                }
            }
        });
        tensor(out, q.rows, q.cols)
    }

    fn cross_attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        heads: usize,
        layout: &CpuLayout,
        per_image: usize,
    ) -> CpuTensor {
        assert_eq!(
            layout.image_of_row.len(),
            q.rows,
            "query rows do not match the step"
        );
        let d = q.cols / heads;
        let scale = (d as f32).powf(-0.5);
        let out = attention::per_row_head(&q.data, q.rows, heads, d, |i, h, qh, out, scores| {
            let Ok(image) = usize::try_from(layout.image_of_row[i]) else {
                out.fill(0.0);
                return;
            };
            let key = |j: usize| head_of_row(k, v, image * per_image + j, (h, heads), d);
            attention::attend(qh, per_image, key, scale, scores, out);
        });
        tensor(out, q.rows, q.cols)
    }

    /// The CPU has no launches to record.
    type StepGraphs = std::convert::Infallible;

    fn new_step_graphs(&self, _head_dim: usize) -> Option<Self::StepGraphs> {
        None
    }

    fn run_recorded(
        &self,
        graphs: &mut Self::StepGraphs,
        _ids: &[u32],
        _step: &StepLayout,
        _shape: DecodeShape,
        _rows: usize,
        _run: &mut dyn FnMut(&CpuLayout) -> Result<CpuTensor>,
    ) -> Result<CpuTensor> {
        match *graphs {}
    }

    fn sample(&self, logits: &CpuTensor, rows: &[RowSampling]) -> Result<Vec<Sampled>> {
        assert_eq!(
            logits.rows,
            rows.len(),
            "one sampling rule per row of logits"
        );
        let vocab = logits.cols;
        (0..rows.len())
            .into_par_iter()
            .map(|r| {
                let mut row = logits.data[r * vocab..(r + 1) * vocab].to_vec();
                sampling::sample_row(&mut row, &rows[r]).ok_or_else(|| nothing_to_sample(r))
            })
            .collect()
    }

    fn resampler_attention(
        &self,
        q: &CpuTensor,
        k_ctx: &CpuTensor,
        v_ctx: &CpuTensor,
        k_lat: &CpuTensor,
        v_lat: &CpuTensor,
        heads: usize,
    ) -> CpuTensor {
        let d = q.cols / heads;
        let scale = (d as f32).powf(-0.5);
        let n_ctx = k_ctx.rows;
        let n = n_ctx + k_lat.rows;
        let rows = |j: usize| {
            let (kt, vt, r) = if j < n_ctx {
                (k_ctx, v_ctx, j)
            } else {
                (k_lat, v_lat, j - n_ctx)
            };
            (kt.row(r), vt.row(r))
        };
        if let Some(out) = attention::full(&q.data, q.rows, n, rows, heads, scale) {
            return tensor(out, q.rows, q.cols);
        }
        let out = attention::per_row_head(&q.data, q.rows, heads, d, |_, h, qh, out, scores| {
            let key = |j: usize| {
                let (kt, vt, r) = if j < n_ctx {
                    (k_ctx, v_ctx, j)
                } else {
                    (k_lat, v_lat, j - n_ctx)
                };
                let o = r * kt.cols + h * d;
                (&kt.data[o..o + d], &vt.data[o..o + d])
            };
            attention::attend(qh, n_ctx + k_lat.rows, key, scale, scores, out);
        });
        tensor(out, q.rows, q.cols)
    }
}

/// Rotary embedding (rotate-half) of every head of `x`, each row at its position in the layout; sin and cos in f64.
fn rope_rotate(x: &mut CpuTensor, head_dim: usize, layout: &CpuLayout, freqs: &RopeFrequencies) {
    assert_eq!(layout.rows.len(), x.rows, "RoPE rows do not match the step");
    assert_eq!(x.cols % head_dim, 0);
    let rotating = freqs.rotating(head_dim);
    assert!(rotating % 2 == 0 && rotating <= head_dim, "{rotating} rotary dims of a {head_dim}-wide head");
    let half = rotating / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| freqs.inv_freq(i, rotating))
        .collect();
    let cols = x.cols;
    x.data
        .par_chunks_mut(cols)
        .zip(&layout.rows)
        .for_each(|(row, &(_, pos))| {
            let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|f| {
                    let (s, c) = (pos as f64 * f).sin_cos();
                    (s as f32, c as f32)
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partial rotary (GPT-NeoX): the first `rotary_dims` of each head rotate exactly as a head of that width
    /// would, at every position; the other dims pass through untouched.
    #[test]
    fn partial_rotary_rotates_the_leading_dims_as_a_narrower_head_and_keeps_the_rest() {
        let (head_dim, rot, heads, rows) = (24, 12, 3, 5);
        let layout = CpuLayout {
            step: StepLayout { block_size: 16, seqs: Vec::new() },
            rows: (0..rows).map(|r| (0, 7 * r + 3)).collect(),
            image_of_row: Vec::new(),
        };
        let values: Vec<f32> = (0..rows * heads * head_dim).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut x = tensor(values.clone(), rows, heads * head_dim);
        let partial = RopeFrequencies { rotary_dims: Some(rot), ..RopeFrequencies::plain(10000.0) };
        rope_rotate(&mut x, head_dim, &layout, &partial);
        let narrow: Vec<f32> = values.chunks(head_dim).flat_map(|h| h[..rot].to_vec()).collect();
        let mut want = tensor(narrow, rows, heads * rot);
        rope_rotate(&mut want, rot, &layout, &RopeFrequencies::plain(10000.0));
        for (i, (head, orig)) in x.data.chunks(head_dim).zip(values.chunks(head_dim)).enumerate() {
            assert_eq!(head[..rot], want.data[i * rot..(i + 1) * rot], "head {i}: rotary dims");
            assert_eq!(head[rot..], orig[rot..], "head {i}: pass-through dims");
            assert_ne!(head[..rot], orig[..rot], "head {i}: rotated");
        }
    }
}
