//! `cross_attention` (kernels/cross_attention.cu): IDEFICS's gated cross-attention core, each text row over the
//! keys of its image's media slot (rows without an image give zeros). The gate itself (`tanh(alpha)` residual) is
//! `add_gated` (ops/activation.rs).

use super::attention::{kernel_dim, padded, run_query_tiles, scale, unpadded};
use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::CrossAttention;
use crate::backend::cuda::layout::CudaLayout;

/// Each row of `q` over the `per_image` keys of its media slot in `k`, `v`; -1 rows zero.
pub(in crate::backend::cuda) fn cross_attention(
    b: &CudaBackend,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    heads: usize,
    layout: &CudaLayout,
    per_image: usize,
) -> CudaTensor {
    assert_eq!(q.rows, layout.rows(), "query rows do not match the step");
    assert!(
        heads > 0 && q.cols % heads == 0 && k.cols == q.cols && v.cols == q.cols,
        "cross-attention: widths"
    );
    assert!(
        per_image > 0 && k.rows % per_image == 0,
        "media pool of {} rows for {per_image} per image",
        k.rows
    );
    let d = q.cols / heads;
    let dk = kernel_dim(d, CrossAttention::D, "cross-attention");
    let ([qp, kp, vp], _copies) = padded(b, [q, k, v], heads, d, dk);
    let o = b.alloc(q.rows, heads * dk);
    let ld = heads * dk;
    let kernel = CrossAttention {
        d: dk,
        o: o.ptr(),
        q: qp,
        k: kp,
        v: vp,
        img_idx: layout.images(),
        n_tokens: q.rows,
        n_images: k.rows / per_image,
        img_len: per_image,
        n_heads: heads,
        ldq: ld,
        ldkv: ld,
        ldo: ld,
        scale: scale(d),
    };
    run_query_tiles(b, &kernel, q.rows, heads);
    unpadded(b, o, heads, d, dk)
}
