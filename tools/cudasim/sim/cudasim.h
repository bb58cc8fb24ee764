// cudasim.h - the CUDA C++ dialect of kernels/*.cu on the host: force-included (-include) before every kernel
// file the simulator compiles (build.rs). Each CUDA thread is a fiber; one block runs at a time; __shared__
// variables live in a per-block arena (the build rewrites each `__shared__ T name[N];` into `SIM_SHARED(...)`),
// allocated on first use in a block, poisoned with 0xFF (NaN in bf16, f16 and f32) and freed when the block ends.
// Everything that makes threads wait for each other (barriers, warp collectives) and the PTX wrappers of
// common.cuh (cudasim_ptx.h) are calls into the runtime (runtime.cpp), which checks them.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---- keywords --------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
struct __align__(16) float4 {
  float x, y, z, w;
};

namespace cudasim {

// Where a thread is: the file and line of the barrier or collective it waits at.
struct Site {
  const char* file;
  int line;
};
#define CUDASIM_SITE (cudasim::Site{__FILE__, __LINE__})

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

void syncthreads(Site site);
void syncwarp(unsigned mask, Site site);
// A shuffle of up to 8 bytes: kind 0 xor, 1 up, 2 down, 3 idx.
uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int arg, int width, Site site);
// The block's instance of one __shared__ variable (`key` is unique per declaration and template instance).
void* shared_var(size_t size, size_t align, const void* key, const char* name, Site site);

void cp_async16(void* dst, const void* src, int src_bytes, Site site);
void cp_async_commit();
void cp_async_wait(int pending, Site site);
void load_matrices(unsigned (&r)[4], const void* row, bool trans, Site site);
// `type` is the PTX input type the kernel was compiled for: "bf16" or "f16" (common.cuh's FE_MMA_TYPE).
void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, const char* type, Site site);

template <class T>
T shuffle_value(unsigned mask, T v, int kind, int arg, int width, Site site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = shuffle(mask, bits, kind, arg, width, site);
  T r;
  memcpy(&r, &bits, sizeof(T));
  return r;
}
inline int shuffle_width(int w = 32) { return w; }

// ---- the kernel table: what cuModuleGetFunction finds and cuLaunchKernel calls ---------------------------------
struct Kernel {
  const char* file;    // kernels/<file>
  const char* name;    // the extern "C" symbol
  uint64_t source_hash;  // FNV-1a of the file and every header, as build.rs hashed them
  int max_threads;       // __launch_bounds__' first argument (0: none)
  int nparams;
  const size_t* param_sizes;
  const bool* param_is_pointer;
  void* fn;
  void (*invoke)(void* fn, void** params);
};
void register_kernel(const Kernel* k);

template <class... P, size_t... I>
void invoke_with(void* fn, void** params, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(P...)>(fn)(*static_cast<std::remove_reference_t<P>*>(params[I])...);
}
template <class... P>
struct Signature {
  static constexpr size_t sizes[sizeof...(P) + 1] = {sizeof(P)..., 0};
  static constexpr bool pointers[sizeof...(P) + 1] = {std::is_pointer<P>::value..., false};
  static void invoke(void* fn, void** params) { invoke_with<P...>(fn, params, std::index_sequence_for<P...>{}); }
};
template <class... P>
Kernel kernel_entry(const char* file, const char* name, uint64_t hash, int max_threads, void (*f)(P...)) {
  return Kernel{file, name, hash, max_threads, (int)sizeof...(P), Signature<P...>::sizes, Signature<P...>::pointers, (void*)f,
                &Signature<P...>::invoke};
}
struct Registration {
  explicit Registration(const Kernel& k) : kernel(k) { register_kernel(&kernel); }
  Kernel kernel;
};

}  // namespace cudasim

// ---- built-in variables and synchronisation --------------------------------------------------------------------
#define threadIdx (cudasim::thread_idx())
#define blockIdx (cudasim::block_idx())
#define blockDim (cudasim::block_dim())
#define gridDim (cudasim::grid_dim())
#define warpSize 32
#define __syncthreads() cudasim::syncthreads(CUDASIM_SITE)
#define __syncwarp(...) cudasim::syncwarp(cudasim::full_mask_unless(__VA_ARGS__), CUDASIM_SITE)
namespace cudasim {
inline unsigned full_mask_unless(unsigned m = 0xffffffffu) { return m; }
}  // namespace cudasim
#define __shfl_xor_sync(mask, v, o, ...) \
  cudasim::shuffle_value(mask, v, 0, o, cudasim::shuffle_width(__VA_ARGS__), CUDASIM_SITE)
#define __shfl_up_sync(mask, v, o, ...) \
  cudasim::shuffle_value(mask, v, 1, o, cudasim::shuffle_width(__VA_ARGS__), CUDASIM_SITE)
#define __shfl_down_sync(mask, v, o, ...) \
  cudasim::shuffle_value(mask, v, 2, o, cudasim::shuffle_width(__VA_ARGS__), CUDASIM_SITE)
#define __shfl_sync(mask, v, o, ...) \
  cudasim::shuffle_value(mask, v, 3, o, cudasim::shuffle_width(__VA_ARGS__), CUDASIM_SITE)

// One __shared__ declarator, as build.rs rewrites it: `T (&name) dims` bound to the block's instance. The
// statement expression's static is distinct for every declaration and every template instance.
#define SIM_SHARED(T, ALIGN, NAME, DIMS)                                                                    \
  T(&NAME) DIMS = *static_cast<T(*) DIMS>(cudasim::shared_var(                                             \
      sizeof(T DIMS), (ALIGN) > alignof(T DIMS) ? (ALIGN) : alignof(T DIMS), ({                            \
        static const char sim_key = 0;                                                                      \
        &sim_key;                                                                                           \
      }),                                                                                                   \
      #NAME, CUDASIM_SITE))

// ---- scalar intrinsics -----------------------------------------------------------------------------------------
template <class To, class From>
inline To same_bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}
inline float __int_as_float(int i) { return same_bits<float>(i); }
inline float __uint_as_float(unsigned i) { return same_bits<float>(i); }
inline int __float_as_int(float f) { return same_bits<int>(f); }
inline unsigned __float_as_uint(float f) { return same_bits<unsigned>(f); }
// The hardware's fast exp is exp2 of a product: the same formula (its rounding differs by an ulp or two).
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline void sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline void sincospif(float x, float* s, float* c) {  // sin(pi x), cos(pi x), exact argument reduction
  const double a = (double)x * 3.14159265358979323846;
  *s = (float)sin(a);
  *c = (float)cos(a);
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline unsigned long long __cvta_generic_to_shared(const void* p) { return (unsigned long long)(uintptr_t)p; }

// CUDA's integer min/max overloads (the kernels mix int with long long and unsigned).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(int a, long long b) { return min((long long)a, b); }
inline long long min(long long a, int b) { return min(a, (long long)b); }
inline long long max(int a, long long b) { return max((long long)a, b); }
inline long long max(long long a, int b) { return max(a, (long long)b); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Atomics: real atomic operations, so ThreadSanitizer sees them as synchronisation, not races.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
