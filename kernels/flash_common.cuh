// flash_common.cuh - the tensor-core flash-attention tile shared by attention.cu (prefill),
// cross_attention.cu (IDEFICS gated cross-attention) and resampler_attention.cu (Perceiver attention).
//
// One block of 128 threads (4 warps) computes, for one head, a tile of up to 64 query rows
// (16 per warp) against a range of keys, 64 keys per step:
//     S = (Q K^T) * scale          mma.sync m16n8k16 bf16 -> f32, Q fragments held in registers
//     online softmax in f32        (running max m, running sum l per row; exp2 domain)
//     O += P V                     P re-packed from the S accumulators as bf16 A fragments,
//                                  V fragments via ldmatrix.trans
// The scores never leave registers. K and V tiles are single-buffered but pipelined against
// each other (FlashAttention-2 style): V(j) loads while S(j) is computed, K(j+1) loads while
// P(j)V(j) is computed.
//
// What the three users customise:
//   * key sources: key j < n_a comes from (k_a, v_a) row j, key j >= n_a from (k_b, v_b) row
//     j - n_a, so the Perceiver's [context ; latents] keys are never concatenated in memory;
//   * masking: a functor gives, for each query row of the tile, an interval [lo, hi) of allowed
//     keys (causal, kv offset, image slice, ...). The block visits only the 64-key tiles that meet
//     the union of the intervals, tiles aligned to multiples of 64 keys, so a row's result does not
//     depend on the other rows of its block. A row with an empty interval (or only masked keys)
//     outputs exactly 0.
//   * a position bias: with alibi_log2 != 0 (ALiBi, MPT) row r's score for key j gains
//     slope * (j - qpos0 - r); 0 adds exactly nothing.
// Per-head q/k norms (IDEFICS qk_layer_norms) are separate norm.cu launches before these kernels.
// Requirements: D in {64, 80, 96, 128}; every row stride (ldq, ldk, ldv, ldo) % 8 == 0 and every
// base pointer 16-byte aligned (16-byte cp.async and stores; a violation faults loudly).
// Shared memory: 2 x 64 x D bf16 (+ padding for D = 80, 96), at most 32 KiB, static.
#pragma once
#include "common.cuh"

#define FLASH_THREADS 128
#define FLASH_BQ 64
#define FLASH_BKV 64
#define FLASH_INT_MAX 0x7fffffff
// ">= 2 blocks per SM" caps registers at 255 (what 2 x 128 threads allow) and stops ptxas from
// trading a few spills for a third block (seen with D = 96 at 168 registers).
#define FLASH_LAUNCH_BOUNDS __launch_bounds__(FLASH_THREADS, 2)


struct FlashArgs {
  act_t* o;            // row 0 of this tile, column of this head
  const act_t* q;      // row 0 of this tile, column of this head
  const act_t* k_a;    // key 0 of source a, column of the kv head
  const act_t* v_a;
  const act_t* k_b;    // key 0 of source b (may be null when every key index < n_a)
  const act_t* v_b;
  int ldq, ldk, ldv, ldo;
  int n_a;            // keys [0, n_a) come from source a
  int q_rows;         // valid query rows in this tile (1..64)
  float scale_log2;   // softmax scale * log2(e)
  float alibi_log2;   // ALiBi slope of this head * log2(e); 0: no position bias
  int qpos0;          // with ALiBi: key index of tile row 0's own position (row r scores key j + slope * (j - qpos0 - r))
};

// ALiBi slope of head h (src/io/config.rs::Alibi::slope): 2^(-bias_max (k + 1) / n), k = h, or interleaved (odd k
// first, then even) when transformers' MPT rounds the head count up to the power of two n.
FE_DEVICE float alibi_slope(int h, int n, float bias_max, int interleave) {
  const int half = n / 2;
  const int k = interleave ? (h < half ? 2 * h + 1 : 2 * (h - half)) : h;
  return exp2f(-bias_max * (float)(k + 1) / (float)n);
}

struct KeyRange {
  int lo, hi;  // allowed keys [lo, hi)
};

// Shared-memory row layout for a [64][D] bf16 tile. ldmatrix reads 8 rows at one 16-byte chunk:
// when D/8 is a multiple of 8 the rows are 128-byte multiples and would all hit the same banks,
// so the chunk index is XOR-swizzled with (row & 7); otherwise (D = 80, 96) one padding chunk
// per row makes the row stride an odd number of chunks, which is conflict-free too.
template <int D>
struct FlashSmem {
  static constexpr int CH = D / 8;                 // 16-byte chunks per row
  static constexpr bool SWZ = (CH % 8) == 0;
  static constexpr int ROW = SWZ ? D : D + 8;      // elements per smem row
  FE_DEVICE static int off(int row, int chunk) { return row * ROW + ((SWZ ? (chunk ^ (row & 7)) : chunk) << 3); }
  FE_DEVICE static int elem(int row, int e) { return off(row, e >> 3) + (e & 7); }
};

// Async copy of up to 64 rows of D elements into a tile; row r comes from rowptr(r), or is
// zero-filled when rowptr returns null (zero V rows keep 0 * garbage from producing NaN).
template <int D, typename RowPtr>
FE_DEVICE void flash_load_rows(act_t* s, RowPtr rowptr, const act_t* any_valid) {
  using L = FlashSmem<D>;
#pragma unroll
  for (int it = 0; it < FLASH_BKV * L::CH / FLASH_THREADS; ++it) {
    const int i = it * FLASH_THREADS + threadIdx.x;
    const int r = i / L::CH, c = i - r * L::CH;
    const act_t* p = rowptr(r);
    cp_async16(s + L::off(r, c), p ? p + c * 8 : any_valid, p ? 16 : 0);
  }
}

// The tile computation. `range(r)` returns the allowed key interval of tile row r (< q_rows).
template <int D, typename RowRange>
FE_DEVICE void flash_attention_tile(const FlashArgs& a, RowRange range) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using L = FlashSmem<D>;
  constexpr int KSTEPS = D / 16;        // k16 steps of Q K^T
  constexpr int DT = D / 8;             // n8 tiles of O
  constexpr int ST = FLASH_BKV / 8;     // n8 tiles of S
  __shared__ __align__(128) act_t sK[FLASH_BKV * L::ROW];
  __shared__ __align__(128) act_t sV[FLASH_BKV * L::ROW];
  __shared__ int s_range[2];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;

  // ---- key intervals: this thread's two rows (g, g+8 of its warp) and the block's union ----
  KeyRange rr[2];
  int qpos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    qpos[h] = a.qpos0 + r;
    rr[h] = r < a.q_rows ? range(r) : KeyRange{0, 0};
    if (rr[h].hi <= rr[h].lo) rr[h] = KeyRange{FLASH_INT_MAX, 0};  // empty: neutral for the union
  }
  if (warp == 0) {
    KeyRange u{FLASH_INT_MAX, 0};
    for (int r = lane; r < a.q_rows; r += 32) {
      KeyRange x = range(r);
      if (x.hi > x.lo) {
        u.lo = min(u.lo, x.lo);
        u.hi = max(u.hi, x.hi);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      u.lo = min(u.lo, __shfl_xor_sync(0xffffffffu, u.lo, o));
      u.hi = max(u.hi, __shfl_xor_sync(0xffffffffu, u.hi, o));
    }
    if (lane == 0) {
      // Key tiles start at multiples of 64 in key index, not at the union's first key: each key then
      // always falls in the same tile and is folded into a row's online softmax in the same order,
      // whichever rows share the block (batch invariance). Tiles fully masked for a row leave it
      // bit-unchanged (p = 0, correction 1, or 0 before its first key), so the extra keys of a
      // partial first tile cost time, never precision.
      s_range[0] = u.lo - u.lo % FLASH_BKV;
      s_range[1] = u.hi;
    }
  }

  // ---- Q tile: staged through sK, then held as mma A fragments ----
  flash_load_rows<D>(sK, [&](int r) -> const act_t* { return r < a.q_rows ? a.q + (long long)r * a.ldq : nullptr; },
                     a.q);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int kv_lo = s_range[0], kv_hi = s_range[1];
  unsigned qf[KSTEPS][4];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks)
    ldmatrix_x4(qf[ks], sK + L::off(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));
  __syncthreads();  // sK is reused for K below

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  float m[2] = {FE_NEG_INF, FE_NEG_INF}, l[2] = {0.f, 0.f};

  const int ntiles = kv_hi > kv_lo ? (kv_hi - kv_lo + FLASH_BKV - 1) / FLASH_BKV : 0;
  auto key_row = [&](const act_t* src_a, const act_t* src_b, int ld, int key) -> const act_t* {
    if (key >= kv_hi) return nullptr;
    return key < a.n_a ? src_a + (long long)key * ld : src_b + (long long)(key - a.n_a) * ld;
  };
  auto load_k = [&](int j) {
    const int k0 = kv_lo + j * FLASH_BKV;
    flash_load_rows<D>(sK, [&](int r) { return key_row(a.k_a, a.k_b, a.ldk, k0 + r); }, a.k_a);
  };
  auto load_v = [&](int j) {
    const int k0 = kv_lo + j * FLASH_BKV;
    flash_load_rows<D>(sV, [&](int r) { return key_row(a.v_a, a.v_b, a.ldv, k0 + r); }, a.v_a);
  };

  // Commit groups in order K0, V0, K1, V1, ...; empty groups keep the count regular, so
  // "wait_group 1" always means "all but the most recent group have landed".
  if (ntiles > 0) load_k(0);
  cp_async_commit();
  if (ntiles > 0) load_v(0);
  cp_async_commit();

  for (int j = 0; j < ntiles; ++j) {
    const int k0 = kv_lo + j * FLASH_BKV;
    cp_async_wait<1>();  // K(j) landed (V(j) may still be in flight)
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[ST][4];
#pragma unroll
    for (int i = 0; i < ST; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
      for (int np = 0; np < ST / 2; ++np) {
        unsigned r[4];
        ldmatrix_x4(r, sK + L::off(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
        mma_16816(s[2 * np], qf[ks], r[0], r[1]);
        mma_16816(s[2 * np + 1], qf[ks], r[2], r[3]);
      }
    __syncthreads();  // every warp is done with sK
    if (j + 1 < ntiles) load_k(j + 1);
    cp_async_commit();

    // Online softmax (rows g and g+8; the 4 threads of a quad share a row).
    float mx[2] = {FE_NEG_INF, FE_NEG_INF};
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int key = k0 + nt * 8 + 2 * t + (e & 1);
        const bool ok = key >= rr[h].lo && key < rr[h].hi;
        const float bias = a.alibi_log2 * (float)(key - qpos[h]);
        s[nt][e] = ok ? fmaf(s[nt][e], a.scale_log2, bias) : FE_NEG_INF;
        mx[h] = fmaxf(mx[h], s[nt][e]);
      }
    float corr[2], m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      // A row that has seen no allowed key yet keeps m = -inf; use 0 as the reference so that
      // exp2(-inf - ref) = 0 instead of NaN.
      m_use[h] = m_new == FE_NEG_INF ? 0.f : m_new;
      corr[h] = exp2f(m[h] - m_use[h]);
      m[h] = m_new;
      l[h] *= corr[h];
    }
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        s[nt][e] = exp2f(s[nt][e] - m_use[h]);
        l[h] += s[nt][e];
      }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] *= corr[e >> 1];

    cp_async_wait<1>();  // V(j) landed (K(j+1) may still be in flight)
    __syncthreads();
    // O += P V: the S accumulator layout of n8 tiles (2kk, 2kk+1) is the A fragment of k16 step kk.
#pragma unroll
    for (int kk = 0; kk < FLASH_BKV / 16; ++kk) {
      unsigned pa[4];
      pa[0] = pack_act2(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack_act2(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack_act2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack_act2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned r[4];
        ldmatrix_x4_trans(r, sV + L::off(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)));
        mma_16816(o[2 * dp], pa, r[0], r[1]);
        mma_16816(o[2 * dp + 1], pa, r[2], r[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (j + 1 < ntiles) load_v(j + 1);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // ---- finalise: O / l (0 for rows without any allowed key), staged through sK for 16-byte stores ----
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    inv[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
  }
  __syncthreads();  // sK is free (also when ntiles == 0)
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + g + 8 * h;
      *reinterpret_cast<act2_t*>(sK + L::elem(r, dt * 8 + 2 * t)) =
          floats_to_act2(o[dt][2 * h] * inv[h], o[dt][2 * h + 1] * inv[h]);
    }
  __syncwarp();  // each warp stores only its own 16 rows
#pragma unroll
  for (int it = 0; it < 16 * L::CH / 32; ++it) {
    const int i = it * 32 + lane;
    const int rl = i / L::CH, c = i - rl * L::CH;
    const int r = warp * 16 + rl;
    if (r < a.q_rows)
      *reinterpret_cast<uint4*>(a.o + (long long)r * a.ldo + c * 8) = *reinterpret_cast<const uint4*>(sK + L::off(r, c));
  }
}

FE_DEVICE FlashArgs flash_args_default() {
  FlashArgs a;
  a.o = nullptr;
  a.q = a.k_a = a.v_a = a.k_b = a.v_b = nullptr;
  a.ldq = a.ldk = a.ldv = a.ldo = 0;
  a.n_a = 0;
  a.q_rows = 0;
  a.scale_log2 = 0.f;
  a.alibi_log2 = 0.f;
  a.qpos0 = 0;
  return a;
}
