// Start of an AVX2 + FMA build of a kernel file (csrc/cpu/avx2/*.cpp). The system headers the
// kernels use are included before the target is switched on, so their inline functions stay
// baseline code; everything after (the kernels, scalar.h) is engine::cpu::avx2.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#ifdef ENGINE_CPU_HAVE_AVX2
#undef ENGINE_CPU_ISA
#define ENGINE_CPU_ISA avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#endif
