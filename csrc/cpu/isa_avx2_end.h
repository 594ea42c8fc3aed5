// End of an AVX2 + FMA kernel build (see isa_avx2_begin.h).
#ifdef ENGINE_CPU_HAVE_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
