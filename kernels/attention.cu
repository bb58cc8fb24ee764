// attention.cu - self-attention: flash attention for prefill / the vision encoder, and
// split-KV flash-decoding for one new token per sequence.
//
// Layout: per-head tensors are [tokens, ld] bf16 with head h at columns h*D .. (h+1)*D
// (ld >= n_heads*D; ld > n_heads*D lets q, k, v be column slices of one fused QKV buffer).
// GQA/MQA: query head h reads kv head h / (n_heads / n_kv_heads) (IDEFICS is MHA: equal counts).
// Softmax in f32, accumulation in f32, scale = 1/sqrt(D) passed by the host as `scale`.
// Alignment: every ld % 8 == 0 and every base pointer 16-byte aligned (16-byte loads/stores).
//
// attention_d{64,80,96,128}_{bf16,f16}(o, q, k, v, cu_q, cu_k, n_seqs, n_heads, n_kv_heads,
//                                  ldq, ldk, ldv, ldo, causal, scale, alibi_n, alibi_max, alibi_interleave)
//   Variable-length batch: sequence b owns query rows cu_q[b] .. cu_q[b+1] and key/value rows
//   cu_k[b] .. cu_k[b+1] (int32 prefix offsets, n_seqs + 1 entries each). With Tq, Tk its
//   lengths, query i (0-based) sits at absolute position i + Tk - Tq (the queries are the last Tq
//   of the Tk positions: prefill after a cached prefix, chunked prefill); causal = 1 lets it see
//   keys j <= i + Tk - Tq, causal = 0 sees all Tk keys (ViT encoder). A query that sees no key
//   outputs 0. o: [total queries, ldo].
//   alibi_n > 0 (MPT's ALiBi): the score of query i (absolute position p) for key j gains
//   alibi_slope(h, alibi_n, alibi_max, alibi_interleave) * (j - p) (flash_common.cuh); alibi_n = 0: none.
//   Launch: grid = (ceil(max_Tq / 64), n_heads, n_seqs), block = (128, 1, 1), dynamic smem = 0
//   (static: 16 KiB for D=64, 22 KiB D=80, 26 KiB D=96, 32 KiB D=128).
//   Causal blocks are visited longest-first (blockIdx.x reversed) to balance the tail.
//
// paged_attention_d{16,32,64,128}_{bf16,f16}(o_part, ml_part, q, k_cache, v_cache, kv_lens, block_table,
//                            max_blocks, block_size, seq_stride, n_heads, n_kv_heads, ldq, ldkv,
//                            split_size, scale, alibi_n, alibi_max, alibi_interleave)
//   One query per sequence: q [n_seqs, ldq]. Sequence b attends to its kv_lens[b] cached
//   positions. Cache row of (b, pos):
//     block_table == null (contiguous): row = b * seq_stride + pos
//     paged: row = block_table[b * max_blocks + pos / block_size] * block_size + pos % block_size
//   k_cache, v_cache: [rows, ldkv]. Split-KV: split s covers positions [s*split_size,
//   (s+1)*split_size); it writes its un-normalised partial output and (max, sum) in the log2
//   domain: o_part [n_seqs, n_heads, n_splits, D] f32, ml_part [n_seqs, n_heads, n_splits, 2] f32.
//   Empty splits (past kv_len) write m = -inf, l = 0, o = 0. ALiBi as for attention_d*: the query sits at
//   position kv_len - 1.
//   Launch: grid = (n_heads, n_seqs, n_splits), n_splits >= ceil(max kv_len / split_size) (a recorded
//   CUDA-graph step launches the count of its fixed shape; the extra splits are empty);
//   block = (128, 1, 1), dynamic smem = 0. D/8 lanes per key, 16-byte loads (ldkv % 8 == 0, 16-byte
//   aligned pools). D = 16 and 32 serve small models (and the tiny test models) without padding.
//   Batch invariance: results depend on split_size and kv_len only: keep split_size fixed
//   (e.g. 256), not derived from the batch size.
// paged_attention_combine_{bf16,f16}(o, o_part, ml_part, n_heads, n_splits, head_dim, ldo)
//   o[b, h*D + d] = sum_s 2^(m_s - M) o_s[d] / sum_s 2^(m_s - M) l_s, M = max_s m_s (0 if no key).
//   Splits are folded in index order (deterministic). o: [n_seqs, ldo] bf16.
//   Launch: grid = (n_heads, n_seqs, 1), block = (128, 1, 1), dynamic smem = 0.
//
// CPU reference: src/backend/cpu/mod.rs::attention, src/backend/cpu/mod.rs::paged_attention
// Test: tests/gpu.rs::vision_attention_matches_cpu, tests/gpu.rs::paged_attention_matches_cpu
// Bench: benches/ops.rs::attention, benches/ops.rs::image_attention
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "flash_common.cuh"

// ------------------------------------------------------------------------------------------
// Prefill
// ------------------------------------------------------------------------------------------
template <int D>
FE_DEVICE void flash_prefill(act_t* o, const act_t* q, const act_t* k, const act_t* v, const int* cu_q, const int* cu_k,
                             int n_seqs, int n_heads, int n_kv_heads, int ldq, int ldk, int ldv, int ldo, int causal,
                             float scale, int alibi_n, float alibi_max, int alibi_interleave) {
  const int b = blockIdx.z, h = blockIdx.y;
  if (b >= n_seqs || h >= n_heads || n_kv_heads <= 0 || n_heads % n_kv_heads) return;
  const int qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int q_start = cu_q[b], Tq = cu_q[b + 1] - q_start;
  const int k_start = cu_k[b], Tk = cu_k[b + 1] - k_start;
  const int q0 = qt * FLASH_BQ;
  if (q0 >= Tq) return;
  const int kvh = h / (n_heads / n_kv_heads);

  FlashArgs a = flash_args_default();
  a.q = q + (long long)(q_start + q0) * ldq + h * D;
  a.o = o + (long long)(q_start + q0) * ldo + h * D;
  a.k_a = k + (long long)k_start * ldk + kvh * D;
  a.v_a = v + (long long)k_start * ldv + kvh * D;
  a.ldq = ldq, a.ldk = ldk, a.ldv = ldv, a.ldo = ldo;
  a.n_a = Tk;
  a.q_rows = min(FLASH_BQ, Tq - q0);
  a.scale_log2 = scale * FE_LOG2E;
  const int shift = Tk - Tq + q0;  // absolute position of tile row 0
  a.alibi_log2 = alibi_n > 0 ? alibi_slope(h, alibi_n, alibi_max, alibi_interleave) * FE_LOG2E : 0.f;
  a.qpos0 = shift;
  flash_attention_tile<D>(a, [&](int r) {
    if (!causal) return KeyRange{0, Tk};
    return KeyRange{0, max(0, min(Tk, shift + r + 1))};
  });
}

#define FLASH_PREFILL(D)                                                                                       \
  extern "C" __global__ void FLASH_LAUNCH_BOUNDS ACT_KERNEL(attention_d##D)(                          \
      act_t* o, const act_t* __restrict__ q, const act_t* __restrict__ k, const act_t* __restrict__ v,             \
      const int* __restrict__ cu_q, const int* __restrict__ cu_k, int n_seqs, int n_heads, int n_kv_heads,     \
      int ldq, int ldk, int ldv, int ldo, int causal, float scale, int alibi_n, float alibi_max,                \
      int alibi_interleave) {                                                                                  \
    flash_prefill<D>(o, q, k, v, cu_q, cu_k, n_seqs, n_heads, n_kv_heads, ldq, ldk, ldv, ldo, causal, scale,    \
                     alibi_n, alibi_max, alibi_interleave);                                                    \
  }
FLASH_PREFILL(64)
FLASH_PREFILL(80)
FLASH_PREFILL(96)
FLASH_PREFILL(128)

// ------------------------------------------------------------------------------------------
// Decode (flash-decoding)
// ------------------------------------------------------------------------------------------
#define DEC_THREADS 128
#define DEC_UNROLL 4  // keys per group per iteration: 2 * DEC_UNROLL 16-byte loads in flight

template <int D>
FE_DEVICE void decode_split(float* o_part, float* ml_part, const act_t* q, const act_t* k_cache, const act_t* v_cache,
                            const int* kv_lens, const int* block_table, int max_blocks, int block_size, long long seq_stride,
                            int n_heads, int n_kv_heads, int ldq, int ldkv, int split_size, float scale, int alibi_n,
                            float alibi_max, int alibi_interleave) {
  static_assert(D % 8 == 0 && D <= 128 && 32 % (D / 8) == 0, "decode: head_dim 8, 16, 32, 64 or 128");
  constexpr int GL = D / 8;                  // lanes per key (8 elements each)
  constexpr int NG = DEC_THREADS / GL;       // key groups per block
  __shared__ float s_o[NG][D];
  __shared__ float s_m[NG], s_l[NG];

  const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
  if (n_kv_heads <= 0 || n_heads % n_kv_heads) return;
  const int kvh = h / (n_heads / n_kv_heads);
  const int len = kv_lens[b];
  const int start = split * split_size, end = min(len, start + split_size);
  const int grp = threadIdx.x / GL, gl = threadIdx.x % GL;
  const int col = kvh * D + gl * 8;

  float qv[8];
  load8(q + (long long)b * ldq + h * D, gl * 8, D, true, qv);
  const float sl2 = scale * FE_LOG2E;
#pragma unroll
  for (int j = 0; j < 8; ++j) qv[j] *= sl2;
  // ALiBi: key pos gains slope * (pos - (len - 1)), in the log2 domain like the scores.
  const float alibi_log2 = alibi_n > 0 ? alibi_slope(h, alibi_n, alibi_max, alibi_interleave) * FE_LOG2E : 0.f;

  auto cache_row = [&](int pos) -> long long {
    if (!block_table) return (long long)b * seq_stride + pos;
    const int blk = block_table[(long long)b * max_blocks + pos / block_size];
    return (long long)blk * block_size + pos % block_size;
  };

  // Each group walks keys grp, grp + NG, ... of the split with its own online softmax state. The trip count is the
  // same in every group (the loop runs over the block's `base`, not the group's key), so the shuffles of the dot
  // product run on every lane of a warp together: a full-mask shuffle in a branch taken by some groups of a warp
  // and not others is undefined on sm_70+ (and hangs). Loads and softmax updates are predicated on the key instead.
  float m = FE_NEG_INF, l = 0.f, acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = 0.f;
  for (int base = start; base < end; base += NG * DEC_UNROLL) {
    const int p0 = base + grp;
    float kv[DEC_UNROLL][8], vv[DEC_UNROLL][8];
#pragma unroll
    for (int u = 0; u < DEC_UNROLL; ++u) {  // issue all loads first
      const int pos = p0 + u * NG;
      if (pos < end) {
        const long long row = cache_row(pos);
        load8(k_cache + row * ldkv, col, col + 8, true, kv[u]);
        load8(v_cache + row * ldkv, col, col + 8, true, vv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < DEC_UNROLL; ++u) {
      const bool live = p0 + u * NG < end;  // uniform within a group, not within a warp
      float dot = 0.f;
      if (live) {
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(qv[j], kv[u][j], dot);
      }
#pragma unroll
      for (int off = GL / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (live) {
        dot = fmaf(alibi_log2, (float)(p0 + u * NG - (len - 1)), dot);
        const float m_new = fmaxf(m, dot);
        const float corr = exp2f(m - m_new), p = exp2f(dot - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(p, vv[u][j], acc[j] * corr);
        m = m_new;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) s_o[grp][gl * 8 + j] = acc[j];
  if (gl == 0) {
    s_m[grp] = m;
    s_l[grp] = l;
  }
  __syncthreads();

  // Fold the groups in index order.
  float M = FE_NEG_INF;
#pragma unroll
  for (int i = 0; i < NG; ++i) M = fmaxf(M, s_m[i]);
  const float Mr = M == FE_NEG_INF ? 0.f : M;
  const long long pidx = ((long long)b * n_heads + h) * n_splits + split;
  for (int d = threadIdx.x; d < D; d += DEC_THREADS) {
    float od = 0.f;
#pragma unroll
    for (int i = 0; i < NG; ++i) od += s_o[i][d] * exp2f(s_m[i] - Mr);
    o_part[pidx * D + d] = od;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
#pragma unroll
    for (int i = 0; i < NG; ++i) L += s_l[i] * exp2f(s_m[i] - Mr);
    ml_part[pidx * 2] = M;
    ml_part[pidx * 2 + 1] = L;
  }
}

#define DECODE_ATTN(D)                                                                                           \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS) ACT_KERNEL(paged_attention_d##D)(                             \
      float* __restrict__ o_part, float* __restrict__ ml_part, const act_t* __restrict__ q,                       \
      const act_t* __restrict__ k_cache, const act_t* __restrict__ v_cache, const int* __restrict__ kv_lens,       \
      const int* __restrict__ block_table, int max_blocks, int block_size, long long seq_stride, int n_heads,    \
      int n_kv_heads, int ldq, int ldkv, int split_size, float scale, int alibi_n, float alibi_max,            \
      int alibi_interleave) {                                                                                    \
    decode_split<D>(o_part, ml_part, q, k_cache, v_cache, kv_lens, block_table, max_blocks, block_size,          \
                    seq_stride, n_heads, n_kv_heads, ldq, ldkv, split_size, scale, alibi_n, alibi_max,          \
                    alibi_interleave);                                                                           \
  }
DECODE_ATTN(16)
DECODE_ATTN(32)
DECODE_ATTN(64)
DECODE_ATTN(128)

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    ACT_KERNEL(paged_attention_combine)(act_t* __restrict__ o, const float* __restrict__ o_part, const float* __restrict__ ml_part,
                             int n_heads, int n_splits, int head_dim, int ldo) {
  const int h = blockIdx.x, b = blockIdx.y;
  const long long base = ((long long)b * n_heads + h) * n_splits;
  float M = FE_NEG_INF;
  for (int s = 0; s < n_splits; ++s) M = fmaxf(M, ml_part[(base + s) * 2]);
  const float Mr = M == FE_NEG_INF ? 0.f : M;
  float L = 0.f;
  for (int s = 0; s < n_splits; ++s) L += ml_part[(base + s) * 2 + 1] * exp2f(ml_part[(base + s) * 2] - Mr);
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += DEC_THREADS) {
    float od = 0.f;
    for (int s = 0; s < n_splits; ++s) od += o_part[(base + s) * head_dim + d] * exp2f(ml_part[(base + s) * 2] - Mr);
    o[(long long)b * ldo + h * head_dim + d] = to_act(od * inv);
  }
}
