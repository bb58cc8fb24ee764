// cross_attention.cu - IDEFICS gated cross-attention core (text queries -> one request's image K/V).
//
// cross_attention_d{64,128}_{bf16,f16}(o, q, k, v, img_idx, n_tokens, n_images, img_len, n_heads,
//                            ldq, ldkv, ldo, scale)
//   q:   [n_tokens, ldq]  text queries (q_proj output), head h at columns h*D .. (h+1)*D.
//   k,v: [n_images * img_len, ldkv]  the request's cached image keys / values (k_proj, v_proj of
//        the resampler output, img_len = S = 64 latents per image, or 257 without resampler);
//        image i owns rows i*img_len .. (i+1)*img_len. With qk_layer_norms, q and k come already
//        RMS-normalised per head (rms_norm_{bf16,f16} with a [D] weight; k once per image, when the media
//        cache is filled).
//   img_idx: [n_tokens] int32, the image each token attends to (IDEFICS: the most recent
//        preceding <image>, one-hot mask); -1 (or any value outside [0, n_images)) = no image.
//   o:   [n_tokens, ldo] = softmax(q k_img^T * scale) v_img per head; rows of tokens without an
//        image are exactly 0 (the HF cross_attention_gate), so o_proj (no bias) maps them to 0
//        and the tanh(alpha) residual (add_gated_{bf16,f16}) leaves h unchanged there.
//   Launch: grid = (ceil(n_tokens / 64), n_heads, 1), block = (128, 1, 1), dynamic smem = 0
//   (static 16 KiB for D=64, 32 KiB for D=128). A 64-token tile visits only the key range of the
//   images its tokens reference (usually one image: 1 key tile for S = 64).
//   Alignment: ldq, ldkv, ldo % 8 == 0; base pointers 16-byte aligned.
//
// CPU reference: src/backend/cpu/mod.rs::cross_attention
// Test: tests/gpu.rs::cross_attention_matches_cpu
// Bench: benches/ops.rs::cross_attention
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "flash_common.cuh"

template <int D>
FE_DEVICE void cross_attention(act_t* o, const act_t* q, const act_t* k, const act_t* v, const int* img_idx, int n_tokens,
                           int n_images, int img_len, int n_heads, int ldq, int ldkv, int ldo, float scale) {
  const int h = blockIdx.y, q0 = blockIdx.x * FLASH_BQ;
  if (h >= n_heads || q0 >= n_tokens) return;
  FlashArgs a = flash_args_default();
  a.q = q + (long long)q0 * ldq + h * D;
  a.o = o + (long long)q0 * ldo + h * D;
  a.k_a = k + h * D;
  a.v_a = v + h * D;
  a.ldq = ldq, a.ldk = ldkv, a.ldv = ldkv, a.ldo = ldo;
  a.n_a = n_images * img_len;
  a.q_rows = min(FLASH_BQ, n_tokens - q0);
  a.scale_log2 = scale * FE_LOG2E;
  const int* ids = img_idx + q0;
  flash_attention_tile<D>(a, [&](int r) {
    const int img = ids[r];
    if (img < 0 || img >= n_images) return KeyRange{0, 0};
    return KeyRange{img * img_len, (img + 1) * img_len};
  });
}

#define CROSS_ATTENTION(D)                                                                                          \
  extern "C" __global__ void FLASH_LAUNCH_BOUNDS ACT_KERNEL(cross_attention_d##D)(                          \
      act_t* o, const act_t* __restrict__ q, const act_t* __restrict__ k, const act_t* __restrict__ v,              \
      const int* __restrict__ img_idx, int n_tokens, int n_images, int img_len, int n_heads, int ldq, int ldkv, \
      int ldo, float scale) {                                                                                   \
    cross_attention<D>(o, q, k, v, img_idx, n_tokens, n_images, img_len, n_heads, ldq, ldkv, ldo, scale);      \
  }
CROSS_ATTENTION(64)
CROSS_ATTENTION(128)
