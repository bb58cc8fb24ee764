// cuda_fp16.h for the CUDA simulator (tools/cudasim): the f16 types and conversions the kernels use (their
// `-DFE_ACT_F16` variant), on the host. Conversions round to nearest even, keep subnormals, overflow to infinity and
// turn every NaN into the canonical 0x7fff, as cuda_fp16.h's host path does.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  unsigned short __x;
};
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
#ifndef CUDASIM_FLOAT2
#define CUDASIM_FLOAT2  // also declared by the simulator's cuda_bf16.h
struct float2 {
  float x, y;
};
#endif

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in f32
    const float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  const uint32_t u = exp == 0x1f ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  __half r;
  if (a > 0x7f800000u) {
    r.__x = 0x7fff;
  } else if (a >= 0x477ff000u) {  // at or past the midpoint between 65504 and 65536 (and infinity)
    r.__x = (unsigned short)(sign | 0x7c00u);
  } else if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, ties to even (the default rounding mode)
    float mag;
    memcpy(&mag, &a, 4);
    r.__x = (unsigned short)(sign | (uint32_t)std::nearbyint((double)mag * 16777216.0));
  } else {  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
    r.__x = (unsigned short)(sign | ((a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13));
  }
  return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
