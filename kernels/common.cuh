// common.cuh - helpers shared by every kernel file of flamingo-engine.
//
// Compiles under nvcc and NVRTC alike: only CUDA headers (cuda_bf16.h, cuda_fp16.h) are included, no
// libc / libstdc++ headers, because NVRTC has no system include path.
//
// The activation type. Every kernel file is compiled twice: as is, for bf16 activations and weights, and with
// -DFE_ACT_F16 for f16 ones (more mantissa, less range: the engine's `--dtype f16`). Kernels are written once
// over `act_t`, and `ACT_KERNEL(name)` gives each its symbol in the variant: `name_bf16` or `name_f16`.
// Accumulation, softmax and sampling are f32 in both.
//
// Contents
//   * the activation type, its conversions and HF-style rounding helper (rnd_act), special values
//   * 16-byte vector access: 8 act_t per load/store, with a scalar fallback for unaligned
//     or ragged rows (every edge predicated)
//   * warp / block reductions (sum, max) with a fixed, data-independent order, so results
//     are bit-reproducible run to run
//   * activation functions and the epilogue codes shared by gemm.cu and activation.cu
//   * inline-PTX wrappers: cp.async, ldmatrix, mma.sync m16n8k16 (bf16 or f16 inputs)
#pragma once

#ifdef FE_ACT_F16
#include <cuda_fp16.h>
typedef __half act_t;
typedef __half2 act2_t;
#define ACT_KERNEL(name) name##_f16
#define FE_MMA_TYPE "f16"
#else
#include <cuda_bf16.h>
typedef __nv_bfloat16 act_t;
typedef __nv_bfloat162 act2_t;
#define ACT_KERNEL(name) name##_bf16
#define FE_MMA_TYPE "bf16"
#endif

#define FE_DEVICE __device__ __forceinline__

// <cmath> is unavailable under NVRTC: build the special values from bits.
#define FE_INF __int_as_float(0x7f800000)
#define FE_NEG_INF __int_as_float(0xff800000)
#define FE_NAN __int_as_float(0x7fffffff)
#define FE_LOG2E 1.4426950408889634f

#ifdef FE_ACT_F16
FE_DEVICE float to_f(act_t x) { return __half2float(x); }
FE_DEVICE act_t to_act(float x) { return __float2half_rn(x); }
FE_DEVICE float2 act2_to_float2(act2_t h) { return __half22float2(h); }
FE_DEVICE act2_t floats_to_act2(float lo, float hi) { return __floats2half2_rn(lo, hi); }
#else
FE_DEVICE float to_f(act_t x) { return __bfloat162float(x); }
FE_DEVICE act_t to_act(float x) { return __float2bfloat16_rn(x); }
FE_DEVICE float2 act2_to_float2(act2_t h) { return __bfloat1622float2(h); }
FE_DEVICE act2_t floats_to_act2(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
#endif
// Round an f32 to the nearest act_t and back. Used where the HF reference materialises a
// 16-bit intermediate (e.g. Linear output before an activation), so we round at the same point.
FE_DEVICE float rnd_act(float x) { return to_f(to_act(x)); }

FE_DEVICE bool is_aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

// ---------------------------------------------------------------------------------------------
// 16-byte vector access: 8 consecutive act_t <-> 8 floats.
// `vec` must be true only when (row base pointer + c) is 16-byte aligned for every c that is a
// multiple of 8, i.e. base aligned and row length % 8 == 0; callers compute it once per kernel.
// When vec is false, or the chunk runs past n, elements are accessed one by one and elements
// at or beyond n read as 0 / are not written.
// ---------------------------------------------------------------------------------------------
FE_DEVICE void unpack8(const uint4& u, float (&v)[8]) {
  const act2_t* h = reinterpret_cast<const act2_t*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = act2_to_float2(h[j]);
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}

FE_DEVICE uint4 pack8(const float (&v)[8]) {
  uint4 u;
  act2_t* h = reinterpret_cast<act2_t*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = floats_to_act2(v[2 * j], v[2 * j + 1]);
  return u;
}

// Load elements [c, c+8) of a row of length n.
FE_DEVICE void load8(const act_t* row, int c, int n, bool vec, float (&v)[8]) {
  if (vec && c + 8 <= n) {
    unpack8(__ldg(reinterpret_cast<const uint4*>(row + c)), v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (c + j < n) ? to_f(row[c + j]) : 0.f;
  }
}

// Same as load8 but through the coherent path: for buffers the same kernel also writes
// (in-place residual updates), where the read-only (__ldg / nc) path is not allowed.
FE_DEVICE void load8_rw(const act_t* row, int c, int n, bool vec, float (&v)[8]) {
  if (vec && c + 8 <= n) {
    unpack8(*reinterpret_cast<const uint4*>(row + c), v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (c + j < n) ? to_f(row[c + j]) : 0.f;
  }
}

FE_DEVICE void store8(act_t* row, int c, int n, bool vec, const float (&v)[8]) {
  if (vec && c + 8 <= n) {
    *reinterpret_cast<uint4*>(row + c) = pack8(v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (c + j < n) row[c + j] = to_act(v[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. Butterfly (xor) shuffles: every lane ends with the result, and the order of the
// additions is fixed, so the result does not depend on timing.
// ---------------------------------------------------------------------------------------------
FE_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
FE_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
FE_DEVICE int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum / max for a block of NT threads (NT a multiple of 32, <= 1024). `scratch`
// must hold NT/32 floats. Returns the result in every thread. Contains two __syncthreads, so
// it must be called by all threads, and consecutive calls may reuse the same scratch.
template <int NT>
FE_DEVICE float block_sum(float v, float* scratch) {
  constexpr int NW = NT / 32;
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) r += scratch[w];  // same order in every thread
  __syncthreads();                                 // scratch may be reused right after
  return r;
}
template <int NT>
FE_DEVICE float block_max(float v, float* scratch) {
  constexpr int NW = NT / 32;
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < NW; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Activations and epilogues (shared by gemm.cu and activation.cu so the math is identical).
// ---------------------------------------------------------------------------------------------
FE_DEVICE float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
FE_DEVICE float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
FE_DEVICE float quick_gelu(float x) { return x / (1.f + __expf(-1.702f * x)); }
FE_DEVICE float silu(float x) { return x / (1.f + __expf(-x)); }

// Epilogue / activation codes. The Rust side mirrors these values.
enum Epilogue : int {
  EPI_NONE = 0,        // y = acc
  EPI_BIAS = 1,        // y = acc + bias                     (bias may also be given with 2..6)
  EPI_RESIDUAL = 2,    // y = aux + (acc + bias)              aux = residual [M, N]
  EPI_GELU = 3,        // y = gelu_erf(acc + bias)
  EPI_RELU = 4,        // y = relu(acc + bias)
  EPI_SILU_MUL = 5,    // y = silu(acc + bias) * aux          aux = up projection [M, N]
  EPI_QUICK_GELU = 6,  // y = (acc + bias) * sigmoid(1.702 (acc + bias))   (OpenAI CLIP)
  EPI_GELU_TANH = 7,   // y = gelu_tanh(acc + bias)           (gelu_pytorch_tanh)
};

// Applies the epilogue to one f32 accumulator. Rounding mirrors the unfused HF/PyTorch graph:
// the Linear output (acc + bias, bias added in f32 like cuBLAS) is an act_t tensor, and each
// following elementwise op reads act_t and writes act_t. `aux` is the already loaded act_t value.
FE_DEVICE float apply_epilogue(int epi, float acc, float bias, float aux) {
  const float lin = rnd_act(acc + bias);
  switch (epi) {
    case EPI_RESIDUAL: return aux + lin;
    case EPI_GELU: return gelu_erf(lin);
    case EPI_RELU: return fmaxf(lin, 0.f);
    case EPI_SILU_MUL: return rnd_act(silu(lin)) * aux;
    case EPI_QUICK_GELU: return quick_gelu(lin);
    case EPI_GELU_TANH: return gelu_tanh(lin);
    default: return lin;  // EPI_NONE, EPI_BIAS
  }
}
FE_DEVICE bool epilogue_reads_aux(int epi) { return epi == EPI_RESIDUAL || epi == EPI_SILU_MUL; }

// ---------------------------------------------------------------------------------------------
// Tensor-core / async-copy PTX wrappers (sm_80+; all valid on sm_90).
// ---------------------------------------------------------------------------------------------
FE_DEVICE unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

#ifdef FE_SIM
#include "cudasim_ptx.h"  // the CPU simulator's versions (tools/cudasim), checked as it runs them
#else
// 16-byte global -> shared copy that bypasses L1. src_bytes < 16 zero-fills the rest; with
// src_bytes == 0 nothing is read (the source address must still be a valid pointer value).
FE_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
FE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
FE_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

FE_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}
FE_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// D = A(16x16, row) * B(16x8, col) + D, act_t (bf16 or f16) inputs, f32 accumulators (in place).
// The f16 variant has the same fragment layout; only the instruction's input type differs.
// Fragment layout (g = lane/4, t = lane%4):
//   a[0]: A[g][2t..2t+1]  a[1]: A[g+8][2t..]  a[2]: A[g][2t+8..]  a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]  b[1]: B[2t+8..][g]
//   d[0..1]: D[g][2t..2t+1]   d[2..3]: D[g+8][2t..2t+1]
FE_DEVICE void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32." FE_MMA_TYPE "." FE_MMA_TYPE
      ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // FE_SIM

FE_DEVICE unsigned pack_act2(float lo, float hi) {
  act2_t h = floats_to_act2(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// Store two adjacent outputs (col, col+1) of an act_t row; uses one 4-byte store when both are in
// range and the address is 4-byte aligned, else element-wise with predication.
FE_DEVICE void store_pair(act_t* row, int col, int n, float v0, float v1) {
  act_t* p = row + col;
  if (col + 1 < n && (reinterpret_cast<unsigned long long>(p) & 3ull) == 0) {
    *reinterpret_cast<act2_t*>(p) = floats_to_act2(v0, v1);
  } else {
    if (col < n) p[0] = to_act(v0);
    if (col + 1 < n) p[1] = to_act(v1);
  }
}
