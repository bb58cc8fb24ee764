//! `rope` (kernels/rope.cu): rotary position embeddings in place, each row at its position in the step layout.

use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::RopeBf16;
use crate::backend::cuda::layout::CudaLayout;

pub(in crate::backend::cuda) fn rope(
    b: &CudaBackend,
    x: &mut CudaTensor,
    head_dim: usize,
    layout: &CudaLayout,
    theta: f64,
) {
    assert_eq!(x.rows, layout.rows(), "RoPE rows do not match the step");
    assert!(
        head_dim % 2 == 0 && head_dim <= 512 && x.cols % head_dim == 0,
        "RoPE head_dim {head_dim} for width {}",
        x.cols
    );
    let kernel = RopeBf16 {
        q: x.ptr(),
        k: 0,
        positions: layout.positions(),
        tokens: x.rows,
        n_heads_q: x.cols / head_dim,
        n_heads_k: 0,
        head_dim,
        ldq: x.cols,
        ldk: 0,
        theta: theta as f32,
    };
    b.run(&kernel, (x.rows as u32, 1, 1), 128);
}
