// embedding.cu - token embedding lookup.
//
// embedding_{bf16,f16}(out, ids, n_tokens, table_a, vocab_a, table_b, vocab_b, dim)
//   IDEFICS decoupled embedding. ids: [n_tokens] int32; table_a: [vocab_a, dim]; table_b:
//   [vocab_b, dim] (may be null when vocab_b = 0); out: [n_tokens, dim] bf16.
//     id <  vocab_a            -> table_a[id]
//     id <  vocab_a + vocab_b  -> table_b[id - vocab_a]
//   The host refuses out-of-range ids before launching (naming the id); the kernel still clamps one
//   (< 0 or >= vocab_a + vocab_b) into [0, vocab_a + vocab_b - 1], so a replayed step's ids can
//   never read out of bounds. With no table at all it writes zeros.
//   Launch: grid = (n_tokens, 1, 1), block = (128, 1, 1), smem = 0. 16-byte path when dim % 8 == 0
//   and the tables/out are 16-byte aligned.
//
// CPU reference: src/backend/cpu/mod.rs::embedding
// Test: tests/gpu.rs::embedding_and_data_movement_match_cpu
// Bench: benches/ops.rs::data_movement
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define EMB_THREADS 128

extern "C" __global__ void __launch_bounds__(EMB_THREADS)
    ACT_KERNEL(embedding)(act_t* __restrict__ out, const int* __restrict__ ids, int n_tokens, const act_t* __restrict__ table_a,
               int vocab_a, const act_t* __restrict__ table_b, int vocab_b, int dim) {
  const int t = blockIdx.x;
  if (t >= n_tokens) return;
  if (!table_b) vocab_b = 0;
  const int vocab = vocab_a + vocab_b;
  act_t* dst = out + (long long)t * dim;
  int id = ids[t];
  if (vocab <= 0) {  // no table at all: write zeros rather than read anything
    for (int c = threadIdx.x; c < dim; c += EMB_THREADS) dst[c] = to_act(0.f);
    return;
  }
  if (id < 0 || id >= vocab) id = id < 0 ? 0 : vocab - 1;
  const act_t* src = id < vocab_a ? table_a + (long long)id * dim : table_b + (long long)(id - vocab_a) * dim;
  const bool vec = (dim % 8 == 0) && is_aligned16(out) && is_aligned16(table_a) && (!table_b || is_aligned16(table_b));
  for (int c = threadIdx.x * 8; c < dim; c += EMB_THREADS * 8) {
    float v[8];
    load8(src, c, dim, vec, v);
    store8(dst, c, dim, vec, v);
  }
}
