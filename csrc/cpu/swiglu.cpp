// Fused SwiGLU on megatron's fused fc1 output [gate | up]: y = silu(gate) * up, and its
// gradient, with the reference's roundings (silu rounded to the dtype before the product).
#include "parallel.h"

namespace engine::cpu::ENGINE_CPU_ISA {

template <typename T> void swiglu_fwd(const T* x, T* y, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) num_threads(num_threads_for(rows * cols))
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * cols;
    const T* up = gate + cols;
    T* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      A g = load(gate[c]);
      A act = load(store<T>(g * sigmoid(g)));
      yr[c] = store<T>(act * load(up[c]));
    }
  }
}

template <typename T> void swiglu_bwd(const T* dy, const T* x, T* dx, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) num_threads(num_threads_for(rows * cols))
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * cols;
    const T* up = gate + cols;
    const T* gr = dy + r * cols;
    T* dgate = dx + r * 2 * cols;
    T* dup = dgate + cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      A g = load(gate[c]);
      A s = sigmoid(g);
      A go = load(gr[c]);
      A act = load(store<T>(g * s));
      A dact = load(store<T>(go * load(up[c])));
      dup[c] = store<T>(go * act);
      dgate[c] = store<T>(dact * s * (A(1) + g * (A(1) - s)));
    }
  }
}

#define INSTANTIATE(T)                                                \
  template void swiglu_fwd<T>(const T*, T*, int64_t, int64_t);        \
  template void swiglu_bwd<T>(const T*, const T*, T*, int64_t, int64_t);
ENGINE_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace engine::cpu::ENGINE_CPU_ISA
