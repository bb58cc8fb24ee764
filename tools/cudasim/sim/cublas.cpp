// cublas.cpp - a stand-in for cuBLAS (libcublas.so.13) on the simulated device: the calls the engine's yardstick
// makes (src/backend/cuda/cublas.rs), with cublasGemmEx computed on the host (device memory is host memory here)
// for bf16 operands with f32 accumulation. It is a reference product, not a model of cuBLAS' speed.
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>

#define API extern "C" __attribute__((visibility("default")))

typedef int cublasStatus_t;
enum : cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
constexpr int kBf16 = 14, kCompute32F = 68, kOpN = 0, kOpT = 1;

namespace {
struct Handle {
  void* stream;
};

// Element (i, j) of op(M), M column-major with leading dimension ld.
float at(const __nv_bfloat16* m, int op, int ld, int i, int j) {
  return __bfloat162float(op == kOpN ? m[(int64_t)j * ld + i] : m[(int64_t)i * ld + j]);
}
}  // namespace

API cublasStatus_t cublasCreate_v2(Handle** h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new Handle{nullptr};
  return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasDestroy_v2(Handle* h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasSetStream_v2(Handle* h, void* stream) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasGetVersion_v2(Handle*, int* v) {
  *v = 130000;
  return CUBLAS_STATUS_SUCCESS;
}

// C (m x n) = alpha op(A) op(B) + beta C, column-major: bf16 A, B and C, f32 alpha, beta and accumulation.
API cublasStatus_t cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha,
                                const void* A, int atype, int lda, const void* B, int btype, int ldb,
                                const void* beta, void* C, int ctype, int ldc, int compute, int) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (atype != kBf16 || btype != kBf16 || ctype != kBf16 || compute != kCompute32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m < 0 || n < 0 || k < 0 || (transa != kOpN && transa != kOpT) || (transb != kOpN && transb != kOpT))
    return CUBLAS_STATUS_INVALID_VALUE;
  const float a = *(const float*)alpha, b = *(const float*)beta;
  const auto* pa = (const __nv_bfloat16*)A;
  const auto* pb = (const __nv_bfloat16*)B;
  auto* pc = (__nv_bfloat16*)C;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      float acc = 0.f;
      for (int p = 0; p < k; ++p) acc += at(pa, transa, lda, i, p) * at(pb, transb, ldb, p, j);
      __nv_bfloat16& c = pc[(int64_t)j * ldc + i];
      const float old = b == 0.f ? 0.f : __bfloat162float(c);
      c = __float2bfloat16_rn(a * acc + b * old);
    }
  return CUBLAS_STATUS_SUCCESS;
}
