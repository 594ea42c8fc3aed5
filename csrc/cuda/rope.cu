// Fused rotary embedding on CUDA (arithmetic of csrc/cpu/rope.cpp): one thread per rotated pair
// (j, j + rot/2) of one head at one position, cos/sin from the angle and rounded to the dtype;
// a second loop copies the channels past `rot`.
#include "common.cuh"

namespace engine::cuda {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ t, const acc_t<T>* __restrict__ freqs,
                            T* __restrict__ out, int64_t seq, int64_t inner, int64_t dim,
                            int64_t rot, bool backward) {
  using A = acc_t<T>;
  const int64_t half = rot / 2, pass = dim - rot;
  const int64_t pairs = seq * inner * half, copies = seq * inner * pass;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += stride) {
    const int64_t j = i % half, row = i / half, s = row / inner;
    const A* f = freqs + s * rot;
    A s1, c1, s2, c2;
    sincos_acc(f[j], &s1, &c1);
    sincos_acc(f[j + half], &s2, &c2);
    c1 = load(store<T>(c1)), s1 = load(store<T>(s1));
    c2 = load(store<T>(c2)), s2 = load(store<T>(s2));
    const T* ti = t + row * dim;
    T* oi = out + row * dim;
    A a = load(ti[j]), b = load(ti[j + half]);
    if (!backward) {
      oi[j] = store<T>(a * c1 - b * s1);
      oi[j + half] = store<T>(b * c2 + a * s2);
    } else {
      oi[j] = store<T>(a * c1 + b * s2);
      oi[j + half] = store<T>(b * c2 - a * s1);
    }
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < copies; i += stride) {
    const int64_t row = i / pass, j = rot + i % pass;
    out[row * dim + j] = t[row * dim + j];
  }
}

}  // namespace

cudaError_t rope(DType dtype, const void* t, const void* freqs, void* out, int64_t seq,
                 int64_t inner, int64_t dim, int64_t rot, bool backward, cudaStream_t stream) {
  const int64_t work = seq * inner * (rot / 2 > dim - rot ? rot / 2 : dim - rot);
  if (work == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<grid_for(work, kBlock), kBlock, 0, stream>>>(
        static_cast<const T*>(t), static_cast<const acc_t<T>*>(freqs), static_cast<T*>(out), seq,
        inner, dim, rot, backward);
  });
}

}  // namespace engine::cuda
