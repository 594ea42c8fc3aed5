// OpenMP helpers shared by the CPU kernels: run serially below a grain size (thread start-up
// costs more than small rows), else split rows evenly over the threads torch configured
// (torch.set_num_threads sets the OpenMP thread count: both use the libgomp torch ships).
#pragma once

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "scalar.h"

namespace engine::cpu::ENGINE_CPU_ISA {

constexpr int64_t kParallelGrain = 1 << 15;  // elements per call below which one thread works

inline int num_threads_for(int64_t elements) {
#ifdef _OPENMP
  return elements < kParallelGrain ? 1 : omp_get_max_threads();
#else
  (void)elements;
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace engine::cpu::ENGINE_CPU_ISA

// Instantiate a kernel template for the four dtypes the binding dispatches.
#define ENGINE_CPU_INSTANTIATE(MACRO) \
  MACRO(float)                        \
  MACRO(double)                       \
  MACRO(bf16_t)                       \
  MACRO(half_t)
