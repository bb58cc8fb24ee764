// resampler_attention.cu - Perceiver-resampler attention (IDEFICS perceiver.py, OpenFlamingo helpers.py).
//
// resampler_attention_d{64,96,128}_{bf16,f16}(o, q, k_ctx, v_ctx, k_lat, v_lat, n_images, n_ctx, n_lat, n_heads,
//                                  ldq, ldk, ldv, ldo, scale)
//   Per image b and head h: latent queries attend, without mask, to the keys of the
//   concatenation [context rows ; latent rows], given as two separate buffers so the
//   concatenation is never materialised:
//     q:     [n_images * n_lat, ldq]   q_proj(LN_latents(latents)), image b at rows b*n_lat ..
//     k_ctx, v_ctx: [n_images * n_ctx, ldk / ldv]  k_proj / v_proj of LN_context(image features)
//     k_lat, v_lat: [n_images * n_lat, ldk / ldv]  k_proj / v_proj of LN_latents(latents)
//     key j of image b:  j < n_ctx -> k_ctx row b*n_ctx + j, else k_lat row b*n_lat + (j - n_ctx)
//   qk_layer_norms_perceiver: q and k come already LayerNorm-ed over head_dim (layer_norm_{bf16,f16}).
//   o: [n_images * n_lat, ldo] = softmax(q k^T * scale) v per head (merge_heads layout),
//   then output_proj is a GEMM. f32 softmax and accumulation.
//   Launch: grid = (ceil(n_lat / 64), n_heads, n_images), block = (128, 1, 1), dynamic smem = 0
//   (static 16 / 26 / 32 KiB for D = 64 / 96 / 128).
//   D: 96 (IDEFICS 16 x 96), 64 (OpenFlamingo 8 x 64), 128.
//   Alignment: ld* % 8 == 0; base pointers 16-byte aligned.
//
// CPU reference: src/backend/cpu/mod.rs::resampler_attention
// Test: tests/gpu.rs::resampler_attention_matches_cpu
// Bench: benches/ops.rs::image_attention
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "flash_common.cuh"

template <int D>
FE_DEVICE void resampler_attention(act_t* o, const act_t* q, const act_t* k_ctx, const act_t* v_ctx, const act_t* k_lat,
                                   const act_t* v_lat, int n_images, int n_ctx, int n_lat, int n_heads, int ldq, int ldk,
                                   int ldv, int ldo, float scale) {
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FLASH_BQ;
  if (b >= n_images || h >= n_heads || q0 >= n_lat) return;
  const long long lat0 = (long long)b * n_lat, ctx0 = (long long)b * n_ctx;
  FlashArgs a = flash_args_default();
  a.q = q + (lat0 + q0) * ldq + h * D;
  a.o = o + (lat0 + q0) * ldo + h * D;
  a.k_a = k_ctx + ctx0 * ldk + h * D;
  a.v_a = v_ctx + ctx0 * ldv + h * D;
  a.k_b = k_lat + lat0 * ldk + h * D;
  a.v_b = v_lat + lat0 * ldv + h * D;
  a.ldq = ldq, a.ldk = ldk, a.ldv = ldv, a.ldo = ldo;
  a.n_a = n_ctx;
  a.q_rows = min(FLASH_BQ, n_lat - q0);
  a.scale_log2 = scale * FE_LOG2E;
  const int n_keys = n_ctx + n_lat;
  flash_attention_tile<D>(a, [&](int) { return KeyRange{0, n_keys}; });
}

#define RESAMPLER_ATTENTION(D)                                                                                    \
  extern "C" __global__ void FLASH_LAUNCH_BOUNDS ACT_KERNEL(resampler_attention_d##D)(                                 \
      act_t* o, const act_t* __restrict__ q, const act_t* __restrict__ k_ctx, const act_t* __restrict__ v_ctx,        \
      const act_t* __restrict__ k_lat, const act_t* __restrict__ v_lat, int n_images, int n_ctx, int n_lat,         \
      int n_heads, int ldq, int ldk, int ldv, int ldo, float scale) {                                             \
    resampler_attention<D>(o, q, k_ctx, v_ctx, k_lat, v_lat, n_images, n_ctx, n_lat, n_heads, ldq, ldk, ldv, ldo, \
                           scale);                                                                                \
  }
RESAMPLER_ATTENTION(64)
RESAMPLER_ATTENTION(96)
RESAMPLER_ATTENTION(128)
