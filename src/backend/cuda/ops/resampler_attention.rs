//! `resampler_attention` (kernels/resampler_attention.cu): the Perceiver resampler's attention of one image's
//! latent queries over `[context ; latents]`, without materialising the concatenation.

use super::attention::{kernel_dim, padded, run_query_tiles, scale, unpadded};
use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::ResamplerAttention;

/// Latent queries `q` over the keys `[k_ctx ; k_lat]` and values `[v_ctx ; v_lat]`, no mask.
pub(in crate::backend::cuda) fn resampler_attention(
    b: &CudaBackend,
    q: &CudaTensor,
    [k_ctx, v_ctx, k_lat, v_lat]: [&CudaTensor; 4],
    heads: usize,
) -> CudaTensor {
    let kv = [k_ctx, v_ctx, k_lat, v_lat];
    assert!(
        heads > 0 && q.cols % heads == 0 && kv.iter().all(|t| t.cols == q.cols),
        "resampler attention: widths"
    );
    assert!(
        k_ctx.rows == v_ctx.rows && k_lat.rows == q.rows && v_lat.rows == q.rows,
        "resampler attention: rows"
    );
    let d = q.cols / heads;
    let dk = kernel_dim(d, ResamplerAttention::D, "resampler attention");
    let ([qp, k_ctx_p, v_ctx_p, k_lat_p, v_lat_p], _copies) =
        padded(b, [q, k_ctx, v_ctx, k_lat, v_lat], heads, d, dk);
    let o = b.alloc(q.rows, heads * dk);
    let ld = heads * dk;
    let kernel = ResamplerAttention {
        d: dk,
        o: o.ptr(),
        q: qp,
        k_ctx: k_ctx_p,
        v_ctx: v_ctx_p,
        k_lat: k_lat_p,
        v_lat: v_lat_p,
        n_images: 1,
        n_ctx: k_ctx.rows,
        n_lat: q.rows,
        n_heads: heads,
        ldq: ld,
        ldk: ld,
        ldv: ld,
        ldo: ld,
        scale: scale(d),
    };
    run_query_tiles(b, &kernel, q.rows, heads);
    unpadded(b, o, heads, d, dk)
}
