//! `rope` (kernels/rope.cu): rotary position embeddings of a step's queries and keys in place, in one launch, each
//! row at its position in the step layout.

use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::Rope;
use crate::backend::cuda::layout::CudaLayout;
use crate::io::config::RopeFrequencies;

pub(in crate::backend::cuda) fn rope(
    b: &CudaBackend,
    q: &mut CudaTensor,
    k: &mut CudaTensor,
    head_dim: usize,
    layout: &CudaLayout,
    freqs: &RopeFrequencies,
) {
    let rotating = freqs.rotating(head_dim);
    for x in [&*q, &*k] {
        assert_eq!(x.rows, layout.rows(), "RoPE rows do not match the step");
        assert!(
            rotating % 2 == 0 && rotating <= head_dim && rotating <= 512 && x.cols % head_dim == 0,
            "RoPE of {rotating} dims of head_dim {head_dim} for width {}",
            x.cols
        );
    }
    let kernel = Rope {
        q: q.ptr(),
        k: k.ptr(),
        positions: layout.positions(),
        tokens: q.rows,
        n_heads_q: q.cols / head_dim,
        n_heads_k: k.cols / head_dim,
        head_dim,
        rot_dim: rotating,
        ldq: q.cols,
        ldk: k.cols,
        theta: freqs.theta as f32,
        factor: freqs.llama3.map_or(0.0, |s| s.factor as f32),
        low_freq_factor: freqs.llama3.map_or(1.0, |s| s.low_freq_factor as f32),
        high_freq_factor: freqs.llama3.map_or(2.0, |s| s.high_freq_factor as f32),
        original_max_positions: freqs
            .llama3
            .map_or(1.0, |s| s.original_max_position_embeddings as f32),
    };
    b.run(&kernel, (q.rows as u32, 1, 1), 128);
}
