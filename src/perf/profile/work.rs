//! What each op has to do, from its operand shapes: FLOPs (2 per multiply-add) and bytes moved (read plus written,
//! activations in the backend's activation width, weights in their stored width). The profiler's decorator calls
//! `work::<op>` before timing the op of the same name; every timed `Backend` op has one here, or the build fails.

use crate::backend::{Backend, RowSampling};
use crate::io::config::{Activation, Alibi, RopeFrequencies};

/// A weight with what the cost model needs to know of it.
pub struct ProfiledWeight<W> {
    pub(crate) inner: W,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) bytes: usize,
}

/// A layout with the step it describes (attention work depends on each sequence's positions).
pub struct ProfiledLayout<L> {
    pub(crate) inner: L,
    pub(crate) step: crate::backend::StepLayout,
}

type Weight<B> = ProfiledWeight<<B as Backend>::Weight>;
type Layout<B> = ProfiledLayout<<B as Backend>::Layout>;

/// One op's work; `detail` tells apart calls that get their own row of the table (a linear layer's shape).
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
    pub detail: Option<String>,
}

impl Cost {
    fn moves(bytes: f64) -> Self {
        Cost {
            bytes,
            ..Cost::default()
        }
    }

    fn computes(flops: f64, bytes: f64) -> Self {
        Cost {
            flops,
            bytes,
            detail: None,
        }
    }
}

/// Bytes of `elements` activation values.
fn act<B: Backend>(b: &B, elements: usize) -> f64 {
    (elements * b.activation_width()) as f64
}

fn numel<B: Backend>(b: &B, t: &B::Tensor) -> usize {
    let (r, c) = b.dims(t);
    r * c
}

pub fn from_host<B: Backend>(_: &B, data: &[f32], _rows: usize, _cols: usize) -> Cost {
    Cost::moves((data.len() * 4) as f64)
}

pub fn to_host<B: Backend>(b: &B, t: &B::Tensor) -> Cost {
    Cost::moves((numel(b, t) * 4) as f64)
}

pub fn weight_to_tensor<B: Backend>(b: &B, w: &Weight<B>) -> Cost {
    Cost::moves(w.bytes as f64 + act(b, w.rows * w.cols))
}

pub fn zeros<B: Backend>(b: &B, rows: usize, cols: usize) -> Cost {
    Cost::moves(act(b, rows * cols))
}

pub fn slice_rows<B: Backend>(b: &B, t: &B::Tensor, _start: usize, len: usize) -> Cost {
    Cost::moves(2.0 * act(b, len * b.dims(t).1))
}

pub fn concat_rows<B: Backend>(b: &B, x: &B::Tensor, y: &B::Tensor) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, x) + numel(b, y)))
}

pub fn concat_cols<B: Backend>(b: &B, x: &B::Tensor, y: &B::Tensor) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, x) + numel(b, y)))
}

pub fn write_rows<B: Backend>(b: &B, _dst: &B::Tensor, _row: usize, src: &B::Tensor) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, src)))
}

pub fn gather_rows<B: Backend>(b: &B, t: &B::Tensor, rows: &[usize]) -> Cost {
    Cost::moves(2.0 * act(b, rows.len() * b.dims(t).1))
}

pub fn write_kv<B: Backend>(b: &B, _pool: &B::Tensor, _: &Layout<B>, rows: &B::Tensor) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, rows)))
}

pub fn embedding<B: Backend>(b: &B, ids: &[u32], table: &Weight<B>, _: Option<&Weight<B>>) -> Cost {
    let row_bytes = table.bytes as f64 / table.rows.max(1) as f64;
    Cost::moves(ids.len() as f64 * row_bytes + act(b, ids.len() * table.cols))
}

pub fn linear<B: Backend>(b: &B, x: &B::Tensor, w: &Weight<B>, bias: Option<&Weight<B>>) -> Cost {
    let m = b.dims(x).0;
    let weights = (w.bytes + bias.map_or(0, |b| b.bytes)) as f64;
    Cost {
        flops: 2.0 * (m * w.rows * w.cols) as f64,
        bytes: weights + act(b, m * (w.rows + w.cols)),
        detail: Some(format!("{}x{}", w.rows, w.cols)),
    }
}

pub fn linear_activate<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w: &Weight<B>,
    bias: Option<&Weight<B>>,
    _: Activation,
) -> Cost {
    linear(b, x, w, bias)
}

/// The product's, plus reading the residual it adds to.
pub fn linear_add<B: Backend>(b: &B, acc: &B::Tensor, x: &B::Tensor, w: &Weight<B>, bias: Option<&Weight<B>>) -> Cost {
    let cost = linear(b, x, w, bias);
    Cost { bytes: cost.bytes + act(b, numel(b, acc)), ..cost }
}

pub fn add_assign<B: Backend>(b: &B, _acc: &B::Tensor, x: &B::Tensor) -> Cost {
    Cost::moves(3.0 * act(b, numel(b, x)))
}

pub fn add_gated<B: Backend>(b: &B, _acc: &B::Tensor, x: &B::Tensor, _: &Weight<B>) -> Cost {
    Cost::moves(3.0 * act(b, numel(b, x)))
}

pub fn layer_norm<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w: &Weight<B>,
    bias: &Weight<B>,
    _eps: f32,
) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, x)) + (w.bytes + bias.bytes) as f64)
}

pub fn rms_norm<B: Backend>(b: &B, x: &B::Tensor, w: &Weight<B>, _eps: f32) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, x)) + w.bytes as f64)
}

pub fn activate<B: Backend>(b: &B, x: &B::Tensor, _: Activation) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, x)))
}

pub fn swiglu<B: Backend>(b: &B, gate: &B::Tensor, _up: &B::Tensor) -> Cost {
    Cost::moves(3.0 * act(b, numel(b, gate)))
}

pub fn rope<B: Backend>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    _head_dim: usize,
    _: &Layout<B>,
    _: &RopeFrequencies,
) -> Cost {
    Cost::moves(2.0 * act(b, numel(b, q) + numel(b, k)))
}

pub fn attention<B: Backend>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    _v: &B::Tensor,
    _heads: usize,
) -> Cost {
    let ((tq, w), tk) = (b.dims(q), b.dims(k).0);
    Cost::computes(4.0 * (tq * tk * w) as f64, act(b, 2 * tq * w + 2 * tk * w))
}

pub fn paged_attention<B: Backend>(
    b: &B,
    q: &B::Tensor,
    _k_pool: &B::Tensor,
    _v_pool: &B::Tensor,
    _heads: usize,
    layout: &Layout<B>,
    _alibi: Option<&Alibi>,
) -> Cost {
    let (rows, w) = b.dims(q);
    // Each row attends to the positions up to its own; each sequence's cached K/V is read once.
    let keys: usize = layout.step.row_positions().map(|(_, pos)| pos + 1).sum();
    let cached: usize = layout.step.seqs.iter().map(|s| s.kv_len).sum();
    Cost::computes(
        4.0 * (keys * w) as f64,
        act(b, 2 * rows * w + 2 * cached * w),
    )
}

pub fn cross_attention<B: Backend>(
    b: &B,
    q: &B::Tensor,
    _k: &B::Tensor,
    _v: &B::Tensor,
    _heads: usize,
    layout: &Layout<B>,
    per_image: usize,
) -> Cost {
    let (rows, w) = b.dims(q);
    let image_rows: Vec<i32> = layout
        .step
        .seqs
        .iter()
        .flat_map(|s| s.image_of_row.iter().copied())
        .filter(|&i| i >= 0)
        .collect();
    let mut images = image_rows.clone();
    images.sort_unstable();
    images.dedup();
    Cost::computes(
        4.0 * (image_rows.len() * per_image * w) as f64,
        act(b, 2 * rows * w + 2 * images.len() * per_image * w),
    )
}

pub fn sample<B: Backend>(b: &B, logits: &B::Tensor, _: &[RowSampling]) -> Cost {
    Cost::moves(act(b, numel(b, logits)))
}

pub fn resampler_attention<B: Backend>(
    b: &B,
    q: &B::Tensor,
    k_ctx: &B::Tensor,
    _v_ctx: &B::Tensor,
    k_lat: &B::Tensor,
    _v_lat: &B::Tensor,
    _heads: usize,
) -> Cost {
    let (tq, w) = b.dims(q);
    let keys = b.dims(k_ctx).0 + b.dims(k_lat).0;
    Cost::computes(
        4.0 * (tq * keys * w) as f64,
        act(b, 2 * tq * w + 2 * keys * w),
    )
}
