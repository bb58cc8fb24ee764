// gemm.cu - bf16 Linear layers: y[M, N] = epilogue(x[M, K] @ W[N, K]^T).
//
// Layout: x [M, K] row-major bf16 (activations), W [N, K] row-major bf16 (HF Linear weight
// [out, in]), bias [N] bf16 or null, y [M, ldy] bf16 (ldy >= N; ldy > N writes into a column
// slice of a wider buffer, e.g. the 32000 + 2 columns of the IDEFICS decoupled LM head),
// aux [M, ldy] bf16 (same stride as y) for EPI_RESIDUAL (residual) and EPI_SILU_MUL (up
// projection); aux may alias y (in-place residual add); otherwise null.
// epi: an Epilogue code from common.cuh:
//   0 none, 1 bias, 2 residual add, 3 GELU(erf), 4 ReLU, 5 SiLU(acc) * aux, 6 QuickGELU, 7 GELU(tanh);
//   a non-null bias is added for every code. Roundings follow the unfused PyTorch graph
//   (Linear output rounded to bf16 before the activation / residual add).
// Accumulation is f32. Every edge is predicated: any M, N, K >= 1 (e.g. 1, 7, 257, 1000).
// 16-byte (cp.async) loads when K % 8 == 0 and x, W are 16-byte aligned; otherwise an
// element-wise load path (same results, slower).
//
// gemm_{bf16,f16}(y, x, W, bias, aux, M, N, K, ldy, epi)
//   Tensor cores: mma.sync m16n8k16 bf16 -> f32, ldmatrix from XOR-swizzled shared memory
//   (conflict-free), 3-stage cp.async pipeline, block tile 128 x 128 x 32, 8 warps of 64 x 32.
//   Launch: grid = (ceil(N/128), ceil(M/128), 1), block = (256, 1, 1), dynamic smem = 0
//   (48 KiB static).
// gemm_small_{bf16,f16}(...)  same arguments; block tile 64 x 64 x 32, 4 warps of 32 x 32, for
//   small M or too few 128x128 tiles to fill the GPU.
//   Launch: grid = (ceil(N/64), ceil(M/64), 1), block = (128, 1, 1), dynamic smem = 0 (24 KiB static).
//   Both configurations issue, for every output element, the same sequence of mma operations
//   over K (k-tiles of 32 in order, two k16 steps each), so they give bit-identical results:
//   the host may choose between them by shape without losing batch invariance.
//
// gemv_{bf16,f16}(y, x, W, bias, aux, M, N, K, ldy, epi)
//   Memory-bound path for decode (M <= 8 per row group): one block computes 4 output columns
//   for 8 rows; the K range is split over all 256 threads (8 elements each per step, 16-byte
//   loads of W and x) and the partial sums are combined warp-by-warp in a fixed order.
//   Batch invariance: the reduction order for y[m, n] depends only on K (thread t always owns
//   elements t*8 + i*2048 + 0..7), never on M, N, or the other rows.
//   Its order differs from gemm_{bf16,f16}'s, so for bit-identical decode at every batch size use
//   gemv_{bf16,f16} for all decode rows (row groups of 8 along grid.y; each group re-reads W).
//   Launch: grid = (ceil(N/4), ceil(M/8), 1), block = (256, 1, 1), dynamic smem = 0.
//
// CPU reference: src/backend/cpu/mod.rs::linear
// Test: tests/gpu.rs::linear_matches_cpu, tests/gpu.rs::gemm_rows_are_bit_identical_across_batch_sizes
// Bench: benches/ops.rs::linear
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

// ------------------------------------------------------------------------------------------
// Tensor-core GEMM
// ------------------------------------------------------------------------------------------
#define GEMM_BK 32  // 4 chunks of 16 bytes per smem row

// Shared tiles are [rows][32] bf16 = 64-byte rows. An ldmatrix phase reads 8 consecutive rows
// at one logical chunk; with plain layout rows r and r+2 hit the same banks. XOR-ing the chunk
// with (row >> 1) & 3 spreads the 8 rows over all 8 16-byte bank groups of a 128-byte line.
FE_DEVICE int tile_off(int row, int chunk) { return row * GEMM_BK + ((chunk ^ ((row >> 1) & 3)) << 3); }

// Copies rows [row0, row0 + ROWS) x cols [k0, k0 + 32) of g ([nrows, K] row-major) into the
// swizzled tile s; out-of-range elements become 0, so they add nothing to the products.
template <int ROWS, int NT>
FE_DEVICE void load_tile(act_t* s, const act_t* g, int row0, int nrows, int k0, int K, bool vec) {
  static_assert((ROWS * 4) % NT == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * 4 / NT; ++it) {
    const int i = it * NT + threadIdx.x;
    const int r = i >> 2, c = i & 3;
    const int gr = row0 + r, gk = k0 + c * 8;
    act_t* dst = s + tile_off(r, c);
    if (vec) {  // K % 8 == 0: a chunk is entirely in or out of range
      const bool ok = gr < nrows && gk < K;
      cp_async16(dst, ok ? g + (long long)gr * K + gk : g, ok ? 16 : 0);
    } else {
      const act_t* src = g + (long long)gr * K;
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = (gr < nrows && gk + j < K) ? src[gk + j] : to_act(0.f);
    }
  }
}

FE_DEVICE float load_or_zero(const act_t* p, long long i, bool ok) { return ok ? to_f(p[i]) : 0.f; }

// Applies the epilogue to two adjacent accumulators (row, col..col+1) and stores them.
FE_DEVICE void epilogue_store2(act_t* y, const act_t* bias, const act_t* aux, int M, int N, int ldy, int epi, int row,
                               int col, float v0, float v1) {
  if (row >= M || col >= N) return;
  const bool has1 = col + 1 < N;
  const long long o = (long long)row * ldy + col;
  const bool ra = epilogue_reads_aux(epi);
  const float b0 = bias ? to_f(bias[col]) : 0.f, b1 = load_or_zero(bias, col + 1, bias && has1);
  const float a0 = ra ? to_f(aux[o]) : 0.f, a1 = load_or_zero(aux, o + 1, ra && has1);
  store_pair(y + (long long)row * ldy, col, N, apply_epilogue(epi, v0, b0, a0), apply_epilogue(epi, v1, b1, a1));
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
FE_DEVICE void gemm_body(act_t* y, const act_t* __restrict__ x, const act_t* __restrict__ w, const act_t* __restrict__ bias,
                         const act_t* aux, int M, int N, int K, int ldy, int epi) {
  constexpr int NT = WARPS_M * WARPS_N * 32;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MT = WTM / 16, NTL = WTN / 8;             // mma tiles per warp
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16 x 16");

  __shared__ __align__(128) act_t sA[STAGES][BM * GEMM_BK];
  __shared__ __align__(128) act_t sB[STAGES][BN * GEMM_BK];

  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const bool vec = (K % 8 == 0) && is_aligned16(x) && is_aligned16(w);
  const int ktiles = (K + GEMM_BK - 1) / GEMM_BK;

  float acc[MT][NTL][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Prologue: stages 0 .. STAGES-2 in flight. Always commit (possibly empty groups) so the
  // group count, and therefore cp.async.wait_group's meaning, is the same for every K.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      load_tile<BM, NT>(sA[s], x, m0, M, s * GEMM_BK, K, vec);
      load_tile<BN, NT>(sB[s], w, n0, N, s * GEMM_BK, K, vec);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();              // ... for all threads; and everyone is done with tile kt-1's stage
    {
      const int nk = kt + STAGES - 1;  // refill the stage consumed in iteration kt-1
      if (nk < ktiles) {
        load_tile<BM, NT>(sA[nk % STAGES], x, m0, M, nk * GEMM_BK, K, vec);
        load_tile<BN, NT>(sB[nk % STAGES], w, n0, N, nk * GEMM_BK, K, vec);
      }
      cp_async_commit();
    }
    const act_t* a = sA[kt % STAGES];
    const act_t* b = sB[kt % STAGES];
#pragma unroll
    for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
      unsigned af[MT][4], bfr[NTL][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)  // lanes 0-15: rows 0-15 @ k 0-7; lanes 16-31: rows 0-15 @ k 8-15
        ldmatrix_x4(af[mt], a + tile_off(wm * WTM + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < NTL / 2; ++np) {  // two n8 tiles x two k halves per ldmatrix.x4
        unsigned r[4];
        ldmatrix_x4(r, b + tile_off(wn * WTN + np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
        bfr[2 * np][0] = r[0];
        bfr[2 * np][1] = r[1];
        bfr[2 * np + 1][0] = r[2];
        bfr[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTL; ++nt) mma_16816(acc[mt][nt], af[mt], bfr[nt][0], bfr[nt][1]);
    }
  }
  cp_async_wait<0>();  // nothing useful is pending, but never exit with copies in flight

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt) {
      const int row = m0 + wm * WTM + mt * 16 + g;
      const int col = n0 + wn * WTN + nt * 8 + 2 * t;
      epilogue_store2(y, bias, aux, M, N, ldy, epi, row, col, acc[mt][nt][0], acc[mt][nt][1]);
      epilogue_store2(y, bias, aux, M, N, ldy, epi, row + 8, col, acc[mt][nt][2], acc[mt][nt][3]);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
    ACT_KERNEL(gemm)(act_t* y, const act_t* __restrict__ x, const act_t* __restrict__ w, const act_t* __restrict__ bias,
              const act_t* aux, int M, int N, int K, int ldy, Epilogue epi) {
  gemm_body<128, 128, 2, 4, 3>(y, x, w, bias, aux, M, N, K, ldy, epi);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    ACT_KERNEL(gemm_small)(act_t* y, const act_t* __restrict__ x, const act_t* __restrict__ w, const act_t* __restrict__ bias,
                    const act_t* aux, int M, int N, int K, int ldy, Epilogue epi) {
  gemm_body<64, 64, 2, 2, 3>(y, x, w, bias, aux, M, N, K, ldy, epi);
}

// ------------------------------------------------------------------------------------------
// GEMV / skinny GEMM for decode
// ------------------------------------------------------------------------------------------
#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
#define GEMV_COLS 4   // output columns (W rows) per block: 4 independent 16-byte W loads in flight
#define GEMV_ROWS 8   // x rows per block (grid.y covers more)

extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
    ACT_KERNEL(gemv)(act_t* y, const act_t* __restrict__ x, const act_t* __restrict__ w, const act_t* __restrict__ bias,
              const act_t* aux, int M, int N, int K, int ldy, Epilogue epi) {
  __shared__ float red[GEMV_WARPS][GEMV_COLS * GEMV_ROWS];
  const int n0 = blockIdx.x * GEMV_COLS;
  const int mb = blockIdx.y * GEMV_ROWS;
  const int rows = min(GEMV_ROWS, M - mb);
  if (rows <= 0 || n0 >= N) return;
  const bool vec = (K % 8 == 0) && is_aligned16(x) && is_aligned16(w);
  const act_t* xb = x + (long long)mb * K;

  float acc[GEMV_COLS][GEMV_ROWS];
#pragma unroll
  for (int c = 0; c < GEMV_COLS; ++c)
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; ++m) acc[c][m] = 0.f;

  // Thread t owns k = t*8 + i*2048 + 0..7 for i = 0, 1, ...: a fixed function of K only.
  for (int k = threadIdx.x * 8; k < K; k += GEMV_THREADS * 8) {
    float wv[GEMV_COLS][8];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) {
      if (n0 + c < N) {
        load8(w + (long long)(n0 + c) * K, k, K, vec, wv[c]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) wv[c][j] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; ++m) {
      if (m < rows) {  // uniform branch; the FMA chain of row m is the same for any M
        float xv[8];
        load8(xb + (long long)m * K, k, K, vec, xv);
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[c][m] = fmaf(wv[c][j], xv[j], acc[c][m]);
      }
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < GEMV_COLS; ++c)
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; ++m) {
      if (m < rows) {  // block-uniform: a decode step of one row reduces 4 sums, not 32
        const float v = warp_sum(acc[c][m]);
        if (lane == 0) red[warp][c * GEMV_ROWS + m] = v;
      }
    }
  __syncthreads();
  if (threadIdx.x < GEMV_COLS * GEMV_ROWS) {
    const int c = threadIdx.x / GEMV_ROWS, m = threadIdx.x % GEMV_ROWS;
    const int n = n0 + c, row = mb + m;
    if (m < rows && n < N) {
      float s = 0.f;
#pragma unroll
      for (int wi = 0; wi < GEMV_WARPS; ++wi) s += red[wi][threadIdx.x];  // fixed order
      const long long o = (long long)row * ldy + n;
      const float b = bias ? to_f(bias[n]) : 0.f;
      const float a = epilogue_reads_aux(epi) ? to_f(aux[o]) : 0.f;
      y[o] = to_act(apply_epilogue(epi, s, b, a));
    }
  }
}
