// sampling.cu - next-token selection on the device, one block per row of logits.
//
// logits: [rows, vocab] f32 row-major (convert a 16-bit LM-head output with to_f32_{bf16,f16}; exact).
// Order of use per step: ban_tokens_f32, penalize_tokens_f32 and offset_tokens_f32 (the last two optional,
// in place) -> sample_f32 (greedy rows included). src/backend/cpu/sampling.rs is the CPU reference of all four.
// Every reduction has a fixed order, so the result is a deterministic function of the row.
//
// ban_tokens_f32(logits, rows, vocab, ban_offsets, ban_ids)
//   Sets logits[r, id] = -inf for the banned ids of row r: ban_ids[ban_offsets[r] ..
//   ban_offsets[r+1]) (CSR, int32, ban_offsets has rows + 1 entries). Ids outside [0, vocab) are
//   ignored. Launch: grid = (rows, 1, 1), block = (32, 1, 1), smem = 0.
//
// penalize_tokens_f32(logits, rows, vocab, offsets, ids, penalty)
//   HF repetition penalty: for each id of row r's list ids[offsets[r] .. offsets[r+1]) (CSR as
//   above; the ids of a row must be distinct), logits[r, id] = l > 0 ? l / penalty[r] : l * penalty[r].
//   Ids outside [0, vocab) are ignored. Launch: grid = (rows, 1, 1), block = (128, 1, 1), smem = 0.
//
// offset_tokens_f32(logits, rows, vocab, offsets, ids, values)
//   OpenAI's logit_bias, presence and frequency penalties, combined per id on the host: for each entry i
//   of row r's list (CSR as above, ids distinct within a row), logits[r, ids[i]] += values[i]. Ids
//   outside [0, vocab) are ignored. Launch: grid = (rows, 1, 1), block = (128, 1, 1), smem = 0.
//
// sample_f32(out_ids, logits, rows, vocab, temperature, top_k, top_p, uniform)
//   Per row r (all parameter arrays have `rows` entries):
//     temperature[r] <= 0 (or not finite)  -> greedy: argmax, ties -> lowest index, NaN counts as larger
//       than any number (torch.argmax semantics).
//     x = logits * (1 / temperature) (NaN -> -inf); p_i = softmax(x) (max-subtracted, f32, __expf)
//     top_k[r] in (0, vocab): keep tokens with x >= the k-th largest x (ties kept, like HF TopK)
//     top_p[r] in (0, 1): of those, keep token i iff the probability mass of the kept tokens with
//       x <= x_i is > 1 - top_p (HF TopPLogitsWarper: drop the ascending prefix whose cumulative
//       mass is <= 1 - top_p; the top token always survives, also when 1 - top_p rounds to 1)
//     then pick the token where the cumulative kept mass, in index order, first exceeds
//     uniform[r] * total (inverse CDF, uniform[r] in [0, 1), clamped).
//   A row whose logits are all -inf (everything banned) gets out_ids[r] = -1.
//   The thresholds are found by bisection on the 32-bit order-preserving key of x (32 exact
//   passes each for top-k and top-p, skipped when disabled): no sort, no workspace.
//   Launch: grid = (rows, 1, 1), block = (512, 1, 1), dynamic smem = 0.
//
// CPU reference: src/backend/cpu/sampling.rs::sample_row
// Test: tests/gpu.rs::sampling_matches_cpu
// Bench: benches/ops.rs::sampling
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define PENALTY_THREADS 128
#define SAMPLE_THREADS 512

extern "C" __global__ void __launch_bounds__(32)
    ban_tokens_f32(float* logits, int rows, int vocab, const int* __restrict__ ban_offsets, const int* __restrict__ ban_ids) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  float* row = logits + (long long)r * vocab;
  for (int i = ban_offsets[r] + threadIdx.x; i < ban_offsets[r + 1]; i += blockDim.x) {
    const int id = ban_ids[i];
    if (id >= 0 && id < vocab) row[id] = FE_NEG_INF;
  }
}

extern "C" __global__ void __launch_bounds__(PENALTY_THREADS)
    penalize_tokens_f32(float* logits, int rows, int vocab, const int* __restrict__ offsets,
                        const int* __restrict__ ids, const float* __restrict__ penalty) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  float* row = logits + (long long)r * vocab;
  const float p = penalty[r];
  for (int i = offsets[r] + threadIdx.x; i < offsets[r + 1]; i += blockDim.x) {
    const int id = ids[i];
    if (id < 0 || id >= vocab) continue;
    const float l = row[id];
    row[id] = l > 0.f ? l / p : l * p;
  }
}

extern "C" __global__ void __launch_bounds__(PENALTY_THREADS)
    offset_tokens_f32(float* logits, int rows, int vocab, const int* __restrict__ offsets,
                      const int* __restrict__ ids, const float* __restrict__ values) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  float* row = logits + (long long)r * vocab;
  for (int i = offsets[r] + threadIdx.x; i < offsets[r + 1]; i += blockDim.x) {
    const int id = ids[i];
    if (id >= 0 && id < vocab) row[id] += values[i];
  }
}

// ---- argmax with a total order: NaN > +inf > ... > -inf, then lower index first ----
struct ArgMax {
  float v;
  int i;
};
FE_DEVICE bool am_better(const ArgMax& a, const ArgMax& b) {
  const bool an = a.v != a.v, bn = b.v != b.v;
  if (an != bn) return an;
  if (!an && a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}

template <int NT>
FE_DEVICE ArgMax block_argmax(const float* row, int vocab) {
  __shared__ float sv[NT / 32];
  __shared__ int si[NT / 32];
  ArgMax best{FE_NEG_INF, 0x7fffffff};  // loses to any element, so vocab = 0 -> -1
  for (int i = threadIdx.x; i < vocab; i += NT) {
    const ArgMax c{row[i], i};
    if (am_better(c, best)) best = c;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const ArgMax c{__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
    if (am_better(c, best)) best = c;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = best.v;
    si[warp] = best.i;
  }
  __syncthreads();
  best = ArgMax{sv[0], si[0]};
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) {
    const ArgMax c{sv[w], si[w]};
    if (am_better(c, best)) best = c;
  }
  __syncthreads();
  return best;
}

// The id an argmax names, or -1 when there is nothing to pick (empty row, or every logit -inf).
FE_DEVICE int argmax_id(const ArgMax& best, int vocab) {
  return best.i < vocab && best.v != FE_NEG_INF ? best.i : -1;
}

// ---- sampling ----
// Order-preserving map float -> uint32: a < b  <=>  key(a) < key(b) (for non-NaN).
FE_DEVICE unsigned order_key(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct SampleRow {
  const float* row;
  int vocab;
  float inv_t, mx;
  FE_DEVICE float x(int i) const {
    const float v = row[i] * inv_t;
    return v != v ? FE_NEG_INF : v;
  }
  FE_DEVICE float e(float xv) const { return __expf(xv - mx); }  // 0 for -inf
};

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_f32(int* __restrict__ out_ids, const float* __restrict__ logits, int rows, int vocab,
               const float* __restrict__ temperature, const int* __restrict__ top_k, const float* __restrict__ top_p,
               const float* __restrict__ uniform) {
  constexpr int NT = SAMPLE_THREADS;
  __shared__ float scratch[NT / 32];
  __shared__ int s_pick, s_last;
  const int r = blockIdx.x;
  if (r >= rows) return;
  const float* row = logits + (long long)r * vocab;
  const float temp = temperature[r];

  if (!(temp > 0.f) || temp == FE_INF) {  // greedy (also catches NaN temperature)
    const ArgMax best = block_argmax<NT>(row, vocab);
    if (threadIdx.x == 0) out_ids[r] = argmax_id(best, vocab);
    return;
  }

  SampleRow R{row, vocab, 1.f / temp, 0.f};
  float mx = FE_NEG_INF;
  for (int i = threadIdx.x; i < vocab; i += NT) mx = fmaxf(mx, R.x(i));
  mx = block_max<NT>(mx, scratch);
  if (mx == FE_NEG_INF) {  // nothing can be sampled
    if (threadIdx.x == 0) out_ids[r] = -1;
    return;
  }
  R.mx = mx;

  // Top-k: the largest key t with count(key >= t) >= k, built bit by bit from the MSB
  // (the predicate is monotone, so the greedy choice per bit is exact) = the k-th largest key.
  unsigned tau = 0;
  const int k = top_k[r];
  if (k > 0 && k < vocab) {
    for (int bit = 31; bit >= 0; --bit) {
      const unsigned cand = tau | (1u << bit);
      float cnt = 0.f;  // counts < 2^24 are exact in f32
      for (int i = threadIdx.x; i < vocab; i += NT) cnt += order_key(R.x(i)) >= cand ? 1.f : 0.f;
      if (block_sum<NT>(cnt, scratch) >= (float)k) tau = cand;
    }
  }

  // Top-p: the largest key t (>= tau) with mass(tau <= key < t) <= (1 - p) * mass(key >= tau).
  const float p = top_p[r];
  if (p > 0.f && p < 1.f) {
    float z = 0.f;
    for (int i = threadIdx.x; i < vocab; i += NT) {
      const float xv = R.x(i);
      z += order_key(xv) >= tau ? R.e(xv) : 0.f;
    }
    const float limit = (1.f - p) * block_sum<NT>(z, scratch);
    // Built from 0, not from tau_k: the answer need not contain tau_k's bits, and every t <= tau_k
    // qualifies (nothing lies below it), so the result is >= tau_k anyway.
    const unsigned tau_k = tau;
    tau = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const unsigned cand = tau | (1u << bit);
      float below = 0.f;
      for (int i = threadIdx.x; i < vocab; i += NT) {
        const float xv = R.x(i);
        const unsigned kk = order_key(xv);
        below += (kk >= tau_k && kk < cand) ? R.e(xv) : 0.f;
      }
      if (block_sum<NT>(below, scratch) <= limit) tau = cand;
    }
    // When 1 - p rounds to 1 the bisection runs past every key: keep the top token at least.
    tau = min(tau, order_key(mx));
  }

  // Inverse CDF in index order: thread t owns the contiguous segment [t*seg, (t+1)*seg).
  const int seg = (vocab + NT - 1) / NT;
  const int i0 = min(vocab, threadIdx.x * seg), i1 = min(vocab, i0 + seg);
  float part = 0.f;
  int last_kept = -1;
  for (int i = i0; i < i1; ++i) {
    const float xv = R.x(i);
    if (order_key(xv) >= tau && xv != FE_NEG_INF) {
      part += R.e(xv);
      last_kept = i;
    }
  }
  // Exclusive scan of the per-thread parts (warp shuffles, then the warp totals in order).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float incl = part;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  if (threadIdx.x == 0) s_pick = s_last = -1;
  __syncthreads();
  float warp_off = 0.f, total = 0.f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    if (w < warp) warp_off += scratch[w];
    total += scratch[w];
  }
  // Thread t owns [lo, hi) with lo = hi of thread t-1 computed by the very same float operations,
  // so the intervals tile [0, total) with no gap and no overlap.
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.f;
  const float lo = warp_off + excl, hi = warp_off + incl;
  float u = uniform[r];
  u = fminf(fmaxf(u, 0.f), 0.99999994f);  // [0, 1)
  const float target = u * total;
  if (part > 0.f && target >= lo && target < hi) {
    // Walk the segment again relative to its own start; if rounding leaves the target
    // unreached, the segment's last kept token is the answer.
    const float local = target - lo;
    float acc = 0.f;
    int pick = last_kept;
    for (int i = i0; i < i1; ++i) {
      const float xv = R.x(i);
      if (order_key(xv) >= tau && xv != FE_NEG_INF) {
        acc += R.e(xv);
        if (acc > local) {
          pick = i;
          break;
        }
      }
    }
    atomicMax(&s_pick, pick);  // exactly one thread gets here unless target rounds to total
  }
  atomicMax(&s_last, last_kept);
  __syncthreads();
  if (threadIdx.x == 0) {
    // s_pick < 0 only if rounding put the target at the very end: take the last kept token.
    const int pick = s_pick >= 0 ? s_pick : s_last;
    out_ids[r] = pick;
  }
}
