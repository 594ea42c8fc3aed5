// Scalar math for the CPU kernels, free of torch headers.
//
// Everything here is inline and lives in engine::cpu::ENGINE_CPU_ISA, the namespace of the
// instruction set the including file is compiled for (see kernels.h): the AVX2 build and the
// baseline build of the same helper are different functions, never one symbol the linker could
// pick the wrong copy of. Math goes through compiler builtins and C functions, not std:: inline
// wrappers, for the same reason. Arithmetic happens in acc_t<T> (float; double for double).
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

namespace engine::cpu::ENGINE_CPU_ISA {

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

// IEEE half -> float without F16C (so the build needs no -m flags); exact for every input.
inline float load(half_t v) {
  uint32_t sign = uint32_t(v.bits & 0x8000) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1f;
  uint32_t man = v.bits & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = float(man) * 5.9604644775390625e-08f;  // subnormal: man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T> inline T store(acc_t<T> v);
template <> inline float store<float>(float v) { return v; }
template <> inline double store<double>(double v) { return v; }

// float -> bf16, round to nearest even (as c10::BFloat16); NaN stays a quiet NaN. Branch-free
// (selects only), so loops storing bf16 vectorize.
template <> inline bf16_t store<bf16_t>(float v) {
  uint32_t u = float_to_bits(v);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
}

// float -> half, round to nearest even, with subnormals, overflow to inf and NaN; branch-free.
template <> inline half_t store<half_t>(float v) {
  uint32_t u = float_to_bits(v);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // below 2^-14: adding 0.5 aligns the mantissa so the FPU rounds to the subnormal step 2^-24
  uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias (-112 << 23), round
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a >= 0x477ff000u ? 0x7c00u : h;  // rounds past 65504: inf
  h = a > 0x7f800000u ? 0x7e00u : h;   // nan
  return half_t{uint16_t(sign | h)};
}

// exp(x) for float, ~1 ulp on the range it is used (softmax arguments <= 0, sigmoid), written
// without library calls so GCC vectorizes the loops that call it (Cephes expf polynomial).
inline float exp_approx(float x) {
  x = x < -87.33654f ? -87.33654f : x;  // 2^-126 .. e^88: no inf, no denormal (ternaries, not
  x = x > 88.0f ? 88.0f : x;            // std::min/max: those stop GCC from vectorizing)
  // Round to nearest by the 1.5 * 2^23 trick (no SSE4.1 needed, so the loop vectorizes).
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  return p * bits_to_float(uint32_t(e) << 23);
}
inline double exp_approx(double x) { return exp(x); }

template <typename A> inline A sigmoid(A x) { return A(1) / (A(1) + exp_approx(-x)); }

inline float sqrt_(float x) { return __builtin_sqrtf(x); }
inline double sqrt_(double x) { return __builtin_sqrt(x); }
inline float log_(float x) { return logf(x); }
inline double log_(double x) { return log(x); }
inline float cos_(float x) { return cosf(x); }
inline double cos_(double x) { return cos(x); }
inline float sin_(float x) { return sinf(x); }
inline double sin_(double x) { return sin(x); }

// A zeroed scratch array (calloc/free: no std:: templates instantiated under a target pragma).
template <typename A> struct Scratch {
  A* data;
  explicit Scratch(size_t n) : data(static_cast<A*>(calloc(n ? n : 1, sizeof(A)))) {}
  ~Scratch() { free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

}  // namespace engine::cpu::ENGINE_CPU_ISA
