// Per-row softmax cross-entropy over a chunk of logits, fused with its gradient: one pass for
// the max, one for the sum of exponentials (caching them in place when the dtype is the
// accumulation type), one writing (softmax - onehot) * row_scale over the logits.

#include "parallel.h"

namespace engine::cpu::ENGINE_CPU_ISA {

template <typename T>
void xent(T* logits, const int64_t* target, const acc_t<T>* row_scale, acc_t<T>* loss,
          int64_t rows, int64_t vocab, int64_t ignore_index, bool grad) {
  using A = acc_t<T>;
  constexpr bool cache_exp = sizeof(T) == sizeof(A);  // 16-bit dtypes recompute exp instead
#pragma omp parallel for schedule(static) num_threads(num_threads_for(rows * vocab))
  for (int64_t r = 0; r < rows; ++r) {
    T* x = logits + r * vocab;
    const int64_t tgt = target[r];
    const bool ignored = tgt == ignore_index;
    A mx = -A(INFINITY);
#pragma omp simd reduction(max : mx)
    for (int64_t v = 0; v < vocab; ++v) mx = load(x[v]) > mx ? load(x[v]) : mx;
    const A picked = ignored ? A(0) : load(x[tgt]);
    A sum = 0;
    if (grad && cache_exp) {
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < vocab; ++v) {
        A e = exp_approx(load(x[v]) - mx);
        x[v] = store<T>(e);
        sum += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < vocab; ++v) sum += exp_approx(load(x[v]) - mx);
    }
    const A lse = mx + log_(sum);
    loss[r] = ignored ? A(0) : lse - picked;
    if (!grad) continue;
    const A scale = ignored ? A(0) : (row_scale ? A(row_scale[r]) : A(1));
    const A inv = scale / sum;
    if constexpr (cache_exp) {
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) x[v] = store<T>(load(x[v]) * inv);
    } else {
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) x[v] = store<T>(exp_approx(load(x[v]) - mx) * inv);
    }
    if (!ignored) x[tgt] = store<T>(load(x[tgt]) - scale);
  }
}

#define INSTANTIATE(T)                                                                  \
  template void xent<T>(T*, const int64_t*, const acc_t<T>*, acc_t<T>*, int64_t, int64_t, \
                        int64_t, bool);
ENGINE_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace engine::cpu::ENGINE_CPU_ISA
