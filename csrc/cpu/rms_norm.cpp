// Fused RMSNorm, forward and backward, with the arithmetic of engine.kernels.rmsnorm.rms_norm
// (HF LlamaRMSNorm): the statistic in the accumulation type, the normalized row cast back to the
// input dtype, then scaled by the weight.

#include "parallel.h"

namespace engine::cpu::ENGINE_CPU_ISA {

template <typename T>
void rms_norm_fwd(const T* x, const T* weight, T* y, acc_t<T>* rstd, int64_t rows, int64_t cols,
                  double eps) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) num_threads(num_threads_for(rows * cols))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    A sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t c = 0; c < cols; ++c) {
      A v = load(xr[c]);
      sum_sq += v * v;
    }
    A rs = A(1) / sqrt_(sum_sq / A(cols) + A(eps));
    rstd[r] = rs;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      A normed = load(store<T>(load(xr[c]) * rs));  // cast back before the scale, as HF does
      yr[c] = store<T>(load(weight[c]) * normed);
    }
  }
}

template <typename T>
void rms_norm_bwd(const T* dy, const T* x, const T* weight, const acc_t<T>* rstd, T* dx,
                  acc_t<T>* dweight, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int threads = num_threads_for(rows * cols);
  // One weight-gradient row per thread, summed at the end: no atomics, a fixed order.
  Scratch<A> partial(size_t(threads) * size_t(cols));
#pragma omp parallel num_threads(threads)
  {
    A* dw = partial.data + int64_t(thread_id()) * cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      const T* gr = dy + r * cols;
      T* dxr = dx + r * cols;
      const A rs = rstd[r];
      A dot = 0;  // sum over the row of (dy * weight) * x
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < cols; ++c) {
        A xv = load(xr[c]);
        A g = load(store<T>(load(gr[c]) * load(weight[c])));
        dot += g * xv;
        dw[c] += load(gr[c]) * load(store<T>(xv * rs));
      }
      const A k = rs * rs * rs * dot / A(cols);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        A g = load(store<T>(load(gr[c]) * load(weight[c])));
        dxr[c] = store<T>(rs * g - k * load(xr[c]));
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) dweight[c] = 0;
  for (int t = 0; t < threads; ++t) {
    const A* dw = partial.data + int64_t(t) * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dweight[c] += dw[c];
  }
}

#define INSTANTIATE(T)                                                                     \
  template void rms_norm_fwd<T>(const T*, const T*, T*, acc_t<T>*, int64_t, int64_t, double); \
  template void rms_norm_bwd<T>(const T*, const T*, const T*, const acc_t<T>*, T*, acc_t<T>*,  \
                                int64_t, int64_t);
ENGINE_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace engine::cpu::ENGINE_CPU_ISA
