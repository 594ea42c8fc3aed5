// Fused rotary embedding in megatron's rotate-half layout (rotary_interleaved=False):
// out = t * cos + rotate_half(t) * sin on the first `rot` channels, the rest passed through;
// rotate_half(t) = [-t2, t1]. cos/sin are rounded to the dtype first, as megatron does.
// The backward applies the transpose: dt = g * cos + [g2 * sin2, -g1 * sin1].

#include "parallel.h"

namespace engine::cpu::ENGINE_CPU_ISA {

template <typename T>
void rope(const T* t, const acc_t<T>* freqs, T* out, int64_t seq, int64_t inner, int64_t dim,
          int64_t rot, bool backward) {
  using A = acc_t<T>;
  const int64_t half = rot / 2;
#pragma omp parallel num_threads(num_threads_for(seq * inner * dim))
  {
    Scratch<A> cos_table{size_t(rot)}, sin_table{size_t(rot)};
#pragma omp for schedule(static)
    for (int64_t s = 0; s < seq; ++s) {
      const A* f = freqs + s * rot;
      for (int64_t j = 0; j < rot; ++j) {
        cos_table.data[j] = load(store<T>(cos_(f[j])));
        sin_table.data[j] = load(store<T>(sin_(f[j])));
      }
      const A* c = cos_table.data;
      const A* sn = sin_table.data;
      for (int64_t i = 0; i < inner; ++i) {
        const T* ti = t + (s * inner + i) * dim;
        T* oi = out + (s * inner + i) * dim;
        if (!backward) {
#pragma omp simd
          for (int64_t j = 0; j < half; ++j) {
            A a = load(ti[j]), b = load(ti[j + half]);
            oi[j] = store<T>(a * c[j] - b * sn[j]);
            oi[j + half] = store<T>(b * c[j + half] + a * sn[j + half]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < half; ++j) {
            A a = load(ti[j]), b = load(ti[j + half]);
            oi[j] = store<T>(a * c[j] + b * sn[j + half]);
            oi[j + half] = store<T>(b * c[j + half] - a * sn[j]);
          }
        }
        for (int64_t j = rot; j < dim; ++j) oi[j] = ti[j];
      }
    }
  }
}

#define INSTANTIATE(T) \
  template void rope<T>(const T*, const acc_t<T>*, T*, int64_t, int64_t, int64_t, int64_t, bool);
ENGINE_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace engine::cpu::ENGINE_CPU_ISA
