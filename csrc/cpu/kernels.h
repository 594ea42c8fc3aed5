// CPU kernels of the engine:: operators: plain C++ on raw pointers (no torch headers), OpenMP
// over rows, loops written so the compiler vectorizes them. On x86-64 each kernel file is compiled
// twice: as is (namespace engine::cpu::base, the baseline ISA) and through csrc/cpu/avx2/ with
// AVX2 + FMA (namespace engine::cpu::avx2); binding.cpp picks one at run time, as ATen does.
// Kernels are instantiated for float, double, bf16_t and half_t; the binding checks the rest.
//
// Layouts (all contiguous, row-major):
//   rms_norm   x, y: [rows, cols]; weight: [cols]; rstd: [rows] (acc type)
//   swiglu     x: [rows, 2 * cols] = [gate | up]; y: [rows, cols]
//   rope       t, out: [seq, inner, dim] (inner = batch * heads); freqs: [seq, rot] (acc type)
//   xent       logits: [rows, vocab]; target: [rows] (int64); row_scale, loss: [rows] (acc type)
#pragma once

#include <stdint.h>

#ifndef ENGINE_CPU_ISA
#define ENGINE_CPU_ISA base
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENGINE_CPU_HAVE_AVX2 1
#endif

namespace engine::cpu {

// Bit-compatible with at::BFloat16 / at::Half: the binding passes data pointers straight through.
struct bf16_t {
  uint16_t bits;
};

struct half_t {
  uint16_t bits;
};

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

}  // namespace engine::cpu

#define ENGINE_CPU_DECLARE_KERNELS(ISA)                                                        \
  namespace engine::cpu::ISA {                                                                 \
  template <typename T>                                                                        \
  void rms_norm_fwd(const T* x, const T* weight, T* y, acc_t<T>* rstd, int64_t rows,           \
                    int64_t cols, double eps);                                                 \
  /* dweight is written in the accumulation type; the binding casts it to weight's dtype. */   \
  template <typename T>                                                                        \
  void rms_norm_bwd(const T* dy, const T* x, const T* weight, const acc_t<T>* rstd, T* dx,     \
                    acc_t<T>* dweight, int64_t rows, int64_t cols);                            \
  template <typename T> void swiglu_fwd(const T* x, T* y, int64_t rows, int64_t cols);         \
  template <typename T>                                                                        \
  void swiglu_bwd(const T* dy, const T* x, T* dx, int64_t rows, int64_t cols);                 \
  /* backward = true applies the transposed rotation (the gradient of the forward). */         \
  template <typename T>                                                                        \
  void rope(const T* t, const acc_t<T>* freqs, T* out, int64_t seq, int64_t inner,             \
            int64_t dim, int64_t rot, bool backward);                                          \
  /* Per-row loss = logsumexp(logits) - logits[target], 0 where target == ignore_index. With   \
     grad, logits is overwritten by (softmax - onehot) * row_scale (null: 1), 0 if ignored. */ \
  template <typename T>                                                                        \
  void xent(T* logits, const int64_t* target, const acc_t<T>* row_scale, acc_t<T>* loss,       \
            int64_t rows, int64_t vocab, int64_t ignore_index, bool grad);                     \
  }

ENGINE_CPU_DECLARE_KERNELS(base)
#ifdef ENGINE_CPU_HAVE_AVX2
ENGINE_CPU_DECLARE_KERNELS(avx2)
#endif
