// norm.cu - row normalisations (one block per row).
//
// Layout: x, out, residual are row-major [rows, cols] bf16; weight / bias are [cols] bf16.
// Launch (all kernels): grid = (rows, 1, 1), block = (256, 1, 1), dynamic smem = 0.
// Limits: 1 <= cols <= 8192 (NORM_MAX_COLS; a wider row is not normalised: its output row is
//         filled with NaN so the error is loud). Vector (16-byte) path when cols % 8 == 0 and
//         every pointer is 16-byte aligned; otherwise an element-wise path (same results).
// The row is held in registers (<= 32 floats per thread), so global memory is read once.
//
// rms_norm_{bf16,f16}(out, x, weight, rows, cols, eps)
//     IDEFICS RMSNorm: var = mean(x^2) in f32; n = bf16(x * rsqrt(var + eps)); out = bf16(w * n).
//     (HF casts the normalised value to the weight dtype before multiplying: we round there too.)
//     Also used for the per-head q/k RMSNorm of gated cross-attention: rows = tokens*heads,
//     cols = head_dim (the [tokens, H*d] buffer viewed as [tokens*H, d]).
// layer_norm_{bf16,f16}(out, x, weight, bias, rows, cols, eps)
//     PyTorch LayerNorm: mean and biased variance in f32 (two-pass from registers),
//     out = bf16((x - mean) * rsqrt(var + eps) * w + b). weight and/or bias may be null
//     (treated as 1 / 0) for bias-free or affine-free norms. out may alias x.
//
// CPU reference: src/backend/cpu/mod.rs::rms_norm, src/backend/cpu/mod.rs::layer_norm
// Test: tests/gpu.rs::norms_and_elementwise_ops_match_cpu
// Bench: benches/ops.rs::norms
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define NORM_THREADS 256
#define NORM_VPT 4  // 8-element chunks per thread held in registers
#define NORM_MAX_COLS (NORM_THREADS * NORM_VPT * 8)

// Loads this thread's chunks of a row: chunk i covers columns (i*NT + tid)*8 .. +8.
// Interleaving by thread keeps each warp's 16-byte accesses contiguous (coalesced).
struct RowChunks {
  float v[NORM_VPT][8];
};

FE_DEVICE int chunk_col(int i) { return (i * NORM_THREADS + threadIdx.x) * 8; }

FE_DEVICE bool fill_nan_if_too_wide(act_t* out, int cols) {
  if (cols <= NORM_MAX_COLS) return false;
  for (int c = threadIdx.x; c < cols; c += NORM_THREADS) out[c] = to_act(FE_NAN);
  return true;
}

FE_DEVICE float rms_inv(const RowChunks& r, int cols, float eps, float* scratch) {
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += r.v[i][j] * r.v[i][j];  // out-of-range elements are 0
  ss = block_sum<NORM_THREADS>(ss, scratch);
  return rsqrtf(ss / (float)cols + eps);
}

FE_DEVICE void rms_write(act_t* out, const RowChunks& r, const act_t* __restrict__ w, int cols, float inv,
                         bool vec) {
#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i) {
    const int c = chunk_col(i);
    if (c >= cols) break;
    float wv[8], o[8];
    load8(w, c, cols, vec, wv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = wv[j] * rnd_act(r.v[i][j] * inv);
    store8(out, c, cols, vec, o);
  }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    ACT_KERNEL(rms_norm)(act_t* out, const act_t* x, const act_t* __restrict__ weight, int rows, int cols, float eps) {
  __shared__ float scratch[NORM_THREADS / 32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const long long off = (long long)row * cols;
  if (fill_nan_if_too_wide(out + off, cols)) return;
  const bool vec = (cols % 8 == 0) && is_aligned16(out) && is_aligned16(x) && is_aligned16(weight);

  RowChunks r;
#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i) load8_rw(x + off, chunk_col(i), cols, vec, r.v[i]);  // out may alias x
  const float inv = rms_inv(r, cols, eps, scratch);
  rms_write(out + off, r, weight, cols, inv, vec);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    ACT_KERNEL(layer_norm)(act_t* out, const act_t* x, const act_t* __restrict__ weight, const act_t* __restrict__ bias,
                    int rows, int cols, float eps) {
  __shared__ float scratch[NORM_THREADS / 32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const long long off = (long long)row * cols;
  if (fill_nan_if_too_wide(out + off, cols)) return;
  const bool vec = (cols % 8 == 0) && is_aligned16(out) && is_aligned16(x) && (!weight || is_aligned16(weight)) &&
                   (!bias || is_aligned16(bias));

  RowChunks r;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i) {
    load8_rw(x + off, chunk_col(i), cols, vec, r.v[i]);
#pragma unroll
    for (int j = 0; j < 8; ++j) s += r.v[i][j];
  }
  const float mean = block_sum<NORM_THREADS>(s, scratch) / (float)cols;
  // Second pass over registers: sum of squared deviations (numerically better than E[x^2]-E[x]^2).
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float dv = (chunk_col(i) + j < cols) ? r.v[i][j] - mean : 0.f;
      ss += dv * dv;
    }
  const float inv = rsqrtf(block_sum<NORM_THREADS>(ss, scratch) / (float)cols + eps);

#pragma unroll
  for (int i = 0; i < NORM_VPT; ++i) {
    const int c = chunk_col(i);
    if (c >= cols) break;
    float wv[8], bv[8], o[8];
    if (weight) load8(weight, c, cols, vec, wv);
    if (bias) load8(bias, c, cols, vec, bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = (r.v[i][j] - mean) * inv * (weight ? wv[j] : 1.f) + (bias ? bv[j] : 0.f);
    store8(out + off, c, cols, vec, o);
  }
}
