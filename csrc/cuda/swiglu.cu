// Fused SwiGLU on CUDA (arithmetic of csrc/cpu/swiglu.cpp): a grid-stride loop over
// [rows, cols] outputs reading gate and up from megatron's [gate | up] fc1 rows.
#include "common.cuh"

namespace engine::cuda {
namespace {

template <typename A> __device__ __forceinline__ A sigmoid(A x) {
  return A(1) / (A(1) + exp_acc(-x));
}

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                  int64_t cols) {
  using A = acc_t<T>;
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    A g = load(x[r * 2 * cols + c]);
    A act = load(store<T>(g * sigmoid(g)));
    y[i] = store<T>(act * load(x[r * 2 * cols + cols + c]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                  T* __restrict__ dx, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t gate = r * 2 * cols + c, up = gate + cols;
    A g = load(x[gate]);
    A s = sigmoid(g);
    A go = load(dy[i]);
    A act = load(store<T>(g * s));
    A dact = load(store<T>(go * load(x[up])));
    dx[up] = store<T>(go * act);
    dx[gate] = store<T>(dact * s * (A(1) + g * (A(1) - s)));
  }
}

}  // namespace

cudaError_t swiglu_fwd(DType dtype, const void* x, void* y, int64_t rows, int64_t cols,
                       cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<grid_for(rows * cols, kBlock), kBlock, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), rows, cols);
  });
}

cudaError_t swiglu_bwd(DType dtype, const void* dy, const void* x, void* dx, int64_t rows,
                       int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<grid_for(rows * cols, kBlock), kBlock, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), rows, cols);
  });
}

}  // namespace engine::cuda
