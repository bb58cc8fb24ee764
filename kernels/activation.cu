// activation.cu - elementwise kernels. Every thread handles 8 consecutive elements (one 16-byte
// access when aligned) in a grid-stride loop.
//
// Launch (all kernels): block = (256, 1, 1), dynamic smem = 0,
//   grid = (min(ceil(total / 8 / 256), 65535 * 8), 1, 1) - any grid size is correct (grid-stride),
//   total = rows * cols of the output.
// Vector path when the row length is % 8 and every pointer is 16-byte aligned; otherwise an
// element-wise path with the same results. Rounding follows the unfused PyTorch graph (each
// op reads bf16 and writes bf16), see the comments per kernel.
//
// swiglu_{bf16,f16}(out, gate, up, rows, cols)                       SwiGLU from two buffers
//     gate, up, out: [rows, cols]. out = bf16( bf16(silu(gate)) * up ).  out may alias gate or up.
// activate_{bf16,f16}(x, rows, cols, act)                   x = act(x) in place
//     act: EPI_NONE/EPI_BIAS (0/1, identity), EPI_GELU (3, exact erf), EPI_RELU (4), EPI_QUICK_GELU (6),
//     EPI_GELU_TANH (7). (A Linear's bias and activation fuse into its GEMM epilogue instead.)
// add_gated_{bf16,f16}(h, x, alpha, alpha_len, rows, cols)    gated residual (IDEFICS / Flamingo)
//     h: [rows, cols] updated in place, x: [rows, cols], alpha: bf16 [alpha_len] with alpha_len = 1
//     (alpha_type "float") or cols ("vector"); the gate for column c is alpha[alpha_len == 1 ? 0 : c].
//     h = bf16( h + bf16( bf16(tanh(alpha)) * x ) ).
// add_assign_{bf16,f16}(out, a, b, rows, cols)            residual add: out = bf16(a + b) (PyTorch adds two bf16
//     tensors into a bf16 tensor). out may alias a or b.
// to_f32_{bf16,f16}(out_f32, x, n)           widening copy, e.g. logits before sampling (exact).
//     One element per thread per step: grid = (min(ceil(n / 256), 65535 * 8), 1, 1), block = (256, 1, 1).
//
// CPU reference: src/backend/cpu/mod.rs::swiglu, src/backend/cpu/mod.rs::activate,
//   src/backend/cpu/mod.rs::add_gated, src/backend/cpu/mod.rs::add_assign
// Test: tests/gpu.rs::norms_and_elementwise_ops_match_cpu
// Bench: benches/ops.rs::elementwise
// The tests run on the simulated device (tools/cudasim) in CI and on a GPU where there is one.
#include "common.cuh"

#define ACT_THREADS 256

// Grid-stride loop over 8-element chunks of a [rows, cols] tensor. The callback gets the row,
// the column of the chunk start, and whether the 16-byte path is usable for this chunk.
template <typename F>
FE_DEVICE void for_each_chunk(int rows, int cols, F&& f) {
  const int chunks_per_row = (cols + 7) >> 3;
  const long long total = (long long)rows * chunks_per_row;
  for (long long i = (long long)blockIdx.x * ACT_THREADS + threadIdx.x; i < total;
       i += (long long)gridDim.x * ACT_THREADS) {
    const int r = (int)(i / chunks_per_row);
    const int c = (int)(i - (long long)r * chunks_per_row) * 8;
    f(r, c);
  }
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    ACT_KERNEL(swiglu)(act_t* out, const act_t* gate, const act_t* up, int rows, int cols) {
  const bool vec = (cols % 8 == 0) && is_aligned16(out) && is_aligned16(gate) && is_aligned16(up);
  for_each_chunk(rows, cols, [&](int r, int c) {
    const long long off = (long long)r * cols;
    float g[8], u[8], o[8];
    load8_rw(gate + off, c, cols, vec, g);
    load8_rw(up + off, c, cols, vec, u);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = rnd_act(silu(g[j])) * u[j];
    store8(out + off, c, cols, vec, o);
  });
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    ACT_KERNEL(activate)(act_t* x, int rows, int cols, Epilogue act) {
  // Codes that need a second operand (EPI_RESIDUAL, EPI_SILU_MUL) are GEMM-only: identity here.
  if (epilogue_reads_aux(act)) act = EPI_NONE;
  const bool vec = (cols % 8 == 0) && is_aligned16(x);
  for_each_chunk(rows, cols, [&](int r, int c) {
    const long long off = (long long)r * cols;
    float v[8];
    load8_rw(x + off, c, cols, vec, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = apply_epilogue(act, v[j], 0.f, 0.f);
    store8(x + off, c, cols, vec, v);
  });
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    ACT_KERNEL(add_gated)(act_t* h, const act_t* x, const act_t* __restrict__ alpha, int alpha_len, int rows, int cols) {
  const bool vec = (cols % 8 == 0) && is_aligned16(h) && is_aligned16(x) && (alpha_len == 1 || is_aligned16(alpha));
  const float a0 = rnd_act(tanhf(to_f(alpha[0])));
  for_each_chunk(rows, cols, [&](int r, int c) {
    const long long off = (long long)r * cols;
    float hv[8], xv[8], av[8];
    load8_rw(h + off, c, cols, vec, hv);
    load8_rw(x + off, c, cols, vec, xv);
    if (alpha_len != 1) load8(alpha, c, cols, vec, av);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float g = (alpha_len == 1) ? a0 : rnd_act(tanhf(av[j]));
      hv[j] = hv[j] + rnd_act(g * xv[j]);
    }
    store8(h + off, c, cols, vec, hv);
  });
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    ACT_KERNEL(add_assign)(act_t* out, const act_t* a, const act_t* b, int rows, int cols) {
  const bool vec = (cols % 8 == 0) && is_aligned16(out) && is_aligned16(a) && is_aligned16(b);
  for_each_chunk(rows, cols, [&](int r, int c) {
    const long long off = (long long)r * cols;
    float x[8], y[8];
    load8_rw(a + off, c, cols, vec, x);
    load8_rw(b + off, c, cols, vec, y);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] += y[j];
    store8(out + off, c, cols, vec, x);
  });
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    ACT_KERNEL(to_f32)(float* __restrict__ out, const act_t* __restrict__ x, long long n) {
  for (long long i = (long long)blockIdx.x * ACT_THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * ACT_THREADS)
    out[i] = to_f(x[i]);
}
