// rope.cu - rotary position embedding, NeoX / HF "rotate_half" layout, applied in place.
//
// rope_{bf16,f16}(q, k, positions, tokens, n_heads_q, n_heads_k, head_dim, rot_dim, ldq, ldk, theta,
//           factor, low_freq_factor, high_freq_factor, original_max_positions)
//   q: [tokens, ldq] bf16, head h at columns h*head_dim .. (h+1)*head_dim (ldq >= n_heads_q*head_dim,
//      normally ldq = n_heads_q*head_dim; a larger ld lets q/k live inside a fused QKV buffer)
//   k: [tokens, ldk] bf16, likewise with n_heads_k heads (fewer than q's with grouped-query attention).
//   positions: [tokens] int32, absolute position of each token.
//   Only the first rot_dim (even, <= head_dim) dims of each head rotate, the rest pass through (GPT-NeoX's
//   partial rotary; rot_dim = head_dim elsewhere). For every head and i < half = rot_dim/2, with x1 = x[i],
//   x2 = x[i + half]:
//       inv_freq = 1 / theta^(2i/rot_dim)           (f32, as HF computes it)
//       factor > 0: llama3 scaling (HF _compute_llama3_parameters), wl = 2 pi / inv_freq:
//         wl > original/low_freq_factor: inv_freq / factor; wl < original/high_freq_factor: kept;
//         else s = (original/wl - low)/(high - low), inv_freq = (1-s) inv_freq/factor + s inv_freq.
//       factor = 0: no scaling.
//       f = pos * inv_freq;  c = bf16(cos f);  s = bf16(sin f)
//       x[i]        = bf16( bf16(x1*c) + bf16(-x2*s) )
//       x[i + half] = bf16( bf16(x2*c) + bf16( x1*s) )
//   The bf16 roundings reproduce HF IDEFICS, which casts the cos/sin cache to the activation
//   dtype and evaluates q*cos + rotate_half(q)*sin in bf16.
// Launch: grid = (tokens, 1, 1), block = (128, 1, 1), dynamic smem = 0.
// Limits: rot_dim even, 2 <= rot_dim <= head_dim, rot_dim <= 512 (ROPE_MAX_HALF = 256). Any alignment.
//
// CPU reference: src/backend/cpu/mod.rs::rope_rotate
// Test: tests/gpu.rs::rope_matches_cpu
// Bench: benches/ops.rs::rope
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define ROPE_THREADS 128
#define ROPE_MAX_HALF 256

FE_DEVICE void rope_rotate(act_t* base, int n_heads, int head_dim, int rot_dim, const float* cs, const float* sn) {
  const int half = rot_dim >> 1;
  const int total = n_heads * half;
  // Consecutive threads take consecutive i inside a head: coalesced 2-byte accesses.
  for (int idx = threadIdx.x; idx < total; idx += ROPE_THREADS) {
    const int h = idx / half, i = idx - h * half;
    act_t* p = base + h * head_dim + i;
    const float x1 = to_f(p[0]), x2 = to_f(p[half]);
    const float c = cs[i], s = sn[i];
    p[0] = to_act(rnd_act(x1 * c) + rnd_act(-x2 * s));
    p[half] = to_act(rnd_act(x2 * c) + rnd_act(x1 * s));
  }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    ACT_KERNEL(rope)(act_t* q, act_t* k, const int* __restrict__ positions, int tokens, int n_heads_q, int n_heads_k,
              int head_dim, int rot_dim, int ldq, int ldk, float theta, float factor, float low_freq_factor,
              float high_freq_factor, float original_max_positions) {
  __shared__ float cs[ROPE_MAX_HALF], sn[ROPE_MAX_HALF];
  const int t = blockIdx.x;
  const int half = rot_dim >> 1;
  if (t >= tokens || (rot_dim & 1) || rot_dim > head_dim || half > ROPE_MAX_HALF || half == 0) return;

  // cos/sin once per token, shared by all heads of q and k.
  const float pos = (float)positions[t];
  for (int i = threadIdx.x; i < half; i += ROPE_THREADS) {
    float inv_freq = 1.f / powf(theta, (float)(2 * i) / (float)rot_dim);
    if (factor > 0.f) {
      const float wavelen = 6.28318530717958648f / inv_freq;
      if (wavelen > original_max_positions / low_freq_factor) {
        inv_freq = inv_freq / factor;
      } else if (wavelen >= original_max_positions / high_freq_factor) {
        const float smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
        inv_freq = (1.f - smooth) * inv_freq / factor + smooth * inv_freq;
      }
    }
    const float f = pos * inv_freq;  // the f32 angle HF computes
    // f reaches ~max_position radians. sincosf's large-argument path needs a local-memory
    // table, so reduce exactly in double instead: f/pi mod 2, then sincospif (no reduction).
    double turns = (double)f * 0.318309886183790671538;
    turns -= 2.0 * rint(0.5 * turns);
    float s, c;
    sincospif((float)turns, &s, &c);
    cs[i] = rnd_act(c);
    sn[i] = rnd_act(s);
  }
  __syncthreads();

  rope_rotate(q + (long long)t * ldq, n_heads_q, head_dim, rot_dim, cs, sn);
  rope_rotate(k + (long long)t * ldk, n_heads_k, head_dim, rot_dim, cs, sn);
}
