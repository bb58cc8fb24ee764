//! `rms_norm` and `layer_norm` (kernels/norm.cu): one block per normalised group. A per-head norm is the same
//! kernel on the `[rows * heads, d]` view.

use crate::backend::cuda::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::cuda::launchers::{LayerNorm, RmsNorm};

/// The groups of `x` that a norm of weight `w` normalises, checked against the kernels' limits.
fn groups(x: &CudaTensor, w: &CudaWeight) -> (usize, usize) {
    let width = w.len();
    assert!(
        width > 0 && x.cols % width == 0,
        "row width {} is not a multiple of the norm width {width}",
        x.cols
    );
    assert!(
        width <= 8192,
        "norm width {width} is over the kernels' 8192 (NORM_MAX_COLS in kernels/norm.cu)"
    );
    (x.len() / width, width)
}

pub(in crate::backend::cuda) fn rms_norm(
    b: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    eps: f32,
) -> CudaTensor {
    let (rows, cols) = groups(x, w);
    let out = b.alloc(x.rows, x.cols);
    let kernel = RmsNorm {
        out: out.ptr(),
        x: x.ptr(),
        weight: w.ptr,
        rows,
        cols,
        eps,
    };
    b.run(&kernel, (rows as u32, 1, 1), 256);
    out
}

pub(in crate::backend::cuda) fn layer_norm(
    b: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    bias: &CudaWeight,
    eps: f32,
) -> CudaTensor {
    let (rows, cols) = groups(x, w);
    assert_eq!(
        bias.len(),
        cols,
        "LayerNorm bias and weight differ in length"
    );
    let out = b.alloc(x.rows, x.cols);
    let kernel = LayerNorm {
        out: out.ptr(),
        x: x.ptr(),
        weight: w.ptr,
        bias: bias.ptr,
        rows,
        cols,
        eps,
    };
    b.run(&kernel, (rows as u32, 1, 1), 256);
    out
}
