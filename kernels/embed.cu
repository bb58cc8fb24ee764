// embed.cu - token embedding lookup and vision-input preparation.
//
// embed_bf16(out, ids, n_tokens, table_a, vocab_a, table_b, vocab_b, dim, err)
//   IDEFICS decoupled embedding. ids: [n_tokens] int32; table_a: [vocab_a, dim]; table_b:
//   [vocab_b, dim] (may be null when vocab_b = 0); out: [n_tokens, dim] bf16.
//     id <  vocab_a            -> table_a[id]
//     id <  vocab_a + vocab_b  -> table_b[id - vocab_a]
//   An out-of-range id (< 0 or >= vocab_a + vocab_b) is clamped into [0, vocab_a + vocab_b - 1]
//   and counted: atomicAdd(err, 1) (err: one int32 the host zeroes before and reads after; may be
//   null). So bad input never reads out of bounds and is never silent.
//   Launch: grid = (n_tokens, 1, 1), block = (128, 1, 1), smem = 0. 16-byte path when dim % 8 == 0
//   and the tables/out are 16-byte aligned.
//
// im2col_patches_bf16(out, pixels, n_images, channels, height, width, patch, ld_out)
//   Patch extraction so that a bias-free Conv2d(k = s = patch) becomes a GEMM with the conv weight
//   viewed as [D, channels*patch*patch] (its natural (c, ky, kx) row-major order).
//   pixels: [n_images, channels, height, width] f32 (normalised CHW); gh = height/patch,
//   gw = width/patch (floor, like the conv); out: [n_images*gh*gw, ld_out] bf16,
//   row = img*gh*gw + gy*gw + gx (row-major over (h, w), = HF flatten(2).transpose(1,2)),
//   col = c*patch*patch + ky*patch + kx; columns K = channels*patch*patch .. ld_out-1 are written
//   as 0 (ld_out >= K; pad K to a multiple of 8, e.g. 588 -> 592, and zero-pad the weight the same
//   way to get the GEMM's 16-byte path).
//   Launch: grid = (min(ceil(rows*ld_out / 256), 65535*8), 1, 1), block = (256, 1, 1), smem = 0.
//
// vision_embed_bf16(out, patch_embeds, class_emb, pos_emb, n_images, n_patches, dim)
//   Assembles the ViT input: out[img, 0] = class_emb + pos_emb[0];
//   out[img, 1 + p] = patch_embeds[img*n_patches + p] + pos_emb[1 + p] (bf16 adds, like HF).
//   patch_embeds: [n_images*n_patches, dim]; class_emb: [dim]; pos_emb: [n_patches+1, dim];
//   out: [n_images*(n_patches+1), dim].
//   Launch: grid = (n_images*(n_patches+1), 1, 1), block = (128, 1, 1), smem = 0.
#include "common.cuh"

#define EMB_THREADS 128

extern "C" __global__ void __launch_bounds__(EMB_THREADS)
    embed_bf16(bf16* __restrict__ out, const int* __restrict__ ids, int n_tokens, const bf16* __restrict__ table_a,
               int vocab_a, const bf16* __restrict__ table_b, int vocab_b, int dim, int* err) {
  const int t = blockIdx.x;
  if (t >= n_tokens) return;
  if (!table_b) vocab_b = 0;
  const int vocab = vocab_a + vocab_b;
  bf16* dst = out + (long long)t * dim;
  int id = ids[t];
  if (vocab <= 0) {  // no table at all: flag and write zeros rather than read anything
    if (threadIdx.x == 0 && err) atomicAdd(err, 1);
    for (int c = threadIdx.x; c < dim; c += EMB_THREADS) dst[c] = to_bf(0.f);
    return;
  }
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0 && err) atomicAdd(err, 1);
    id = id < 0 ? 0 : vocab - 1;
  }
  const bf16* src = id < vocab_a ? table_a + (long long)id * dim : table_b + (long long)(id - vocab_a) * dim;
  const bool vec = (dim % 8 == 0) && is_aligned16(out) && is_aligned16(table_a) && (!table_b || is_aligned16(table_b));
  for (int c = threadIdx.x * 8; c < dim; c += EMB_THREADS * 8) {
    float v[8];
    load8(src, c, dim, vec, v);
    store8(dst, c, dim, vec, v);
  }
}

extern "C" __global__ void __launch_bounds__(256)
    im2col_patches_bf16(bf16* __restrict__ out, const float* __restrict__ pixels, int n_images, int channels,
                        int height, int width, int patch, int ld_out) {
  const int gh = height / patch, gw = width / patch;
  const int pp = patch * patch, K = channels * pp;
  const long long rows = (long long)n_images * gh * gw;
  const long long total = rows * ld_out;
  // One thread per output element; consecutive threads write consecutive columns (coalesced
  // stores) and read runs of `patch` consecutive pixels.
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / ld_out;
    const int col = (int)(i - r * ld_out);
    float v = 0.f;
    if (col < K) {
      const int img = (int)(r / (gh * gw));
      const int p = (int)(r - (long long)img * gh * gw);
      const int gy = p / gw, gx = p - gy * gw;
      const int c = col / pp, rem = col - c * pp;
      const int ky = rem / patch, kx = rem - ky * patch;
      v = pixels[(((long long)img * channels + c) * height + gy * patch + ky) * width + gx * patch + kx];
    }
    out[i] = to_bf(v);
  }
}

extern "C" __global__ void __launch_bounds__(EMB_THREADS)
    vision_embed_bf16(bf16* __restrict__ out, const bf16* __restrict__ patch_embeds, const bf16* __restrict__ class_emb,
                      const bf16* __restrict__ pos_emb, int n_images, int n_patches, int dim) {
  const int row = blockIdx.x;  // img * (n_patches + 1) + tok
  const int seq = n_patches + 1;
  if (row >= n_images * seq) return;
  const int img = row / seq, tok = row - img * seq;
  const bf16* src = tok == 0 ? class_emb : patch_embeds + ((long long)img * n_patches + tok - 1) * dim;
  const bf16* pos = pos_emb + (long long)tok * dim;
  bf16* dst = out + (long long)row * dim;
  const bool vec = (dim % 8 == 0) && is_aligned16(out) && is_aligned16(patch_embeds) && is_aligned16(class_emb) &&
                   is_aligned16(pos_emb);
  for (int c = threadIdx.x * 8; c < dim; c += EMB_THREADS * 8) {
    float a[8], b[8];
    load8(src, c, dim, vec, a);
    load8(pos, c, dim, vec, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] += b[j];
    store8(dst, c, dim, vec, a);
  }
}
