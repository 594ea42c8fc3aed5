// ../swiglu.cpp compiled for AVX2 + FMA (namespace engine::cpu::avx2); binding.cpp calls it on CPUs
// that have both. Empty on other architectures.
#include "../isa_avx2_begin.h"
#ifdef ENGINE_CPU_HAVE_AVX2
#include "../swiglu.cpp"
#endif
#include "../isa_avx2_end.h"
