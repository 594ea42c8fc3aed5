// Fused RMSNorm on CUDA (arithmetic of csrc/cpu/rms_norm.cpp): one block per row in the forward;
// the backward walks rows with a fixed grid, each block summing its weight-gradient row into its
// own slice of `partial` (no atomics, deterministic), and a second kernel adds the slices.
#include "common.cuh"

namespace engine::cuda {
namespace {

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                    T* __restrict__ y, acc_t<T>* __restrict__ rstd, int64_t cols,
                                    double eps) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const T* xr = x + r * cols;
  T* yr = y + r * cols;
  A sum_sq = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    A v = load(xr[c]);
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq);
  const A rs = A(1) / sqrt(sum_sq / A(cols) + A(eps));
  if (threadIdx.x == 0) rstd[r] = rs;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    A normed = load(store<T>(load(xr[c]) * rs));  // cast back before the scale, as HF does
    yr[c] = store<T>(load(weight[c]) * normed);
  }
}

template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const T* __restrict__ weight,
                                    const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,
                                    acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  A* dw = partial + int64_t(blockIdx.x) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = A(0);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    const T* gr = dy + r * cols;
    T* dxr = dx + r * cols;
    const A rs = rstd[r];
    A dot = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      A xv = load(xr[c]);
      A g = load(store<T>(load(gr[c]) * load(weight[c])));
      dot += g * xv;
      dw[c] += load(gr[c]) * load(store<T>(xv * rs));  // this thread owns column c
    }
    dot = block_sum(dot);
    const A k = rs * rs * rs * dot / A(cols);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      A g = load(store<T>(load(gr[c]) * load(weight[c])));
      dxr[c] = store<T>(rs * g - k * load(xr[c]));
    }
  }
}

template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partial, A* __restrict__ out,
                                    int64_t blocks, int64_t cols) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  A s = 0;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + c];
  out[c] = s;
}

}  // namespace

cudaError_t rms_norm_fwd(DType dtype, const void* x, const void* weight, void* y, void* rstd,
                         int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_fwd_kernel<T><<<unsigned(rows), kBlock, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(y),
        static_cast<acc_t<T>*>(rstd), cols, eps);
  });
}

int64_t rms_norm_bwd_blocks(int64_t rows) { return rows < 512 ? (rows > 0 ? rows : 1) : 512; }

cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const void* weight,
                         const void* rstd, void* dx, void* partial, void* dweight, int64_t rows,
                         int64_t cols, cudaStream_t stream) {
  const int64_t blocks = rms_norm_bwd_blocks(rows);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    rms_norm_bwd_kernel<T><<<unsigned(blocks), kBlock, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const A*>(rstd), static_cast<T*>(dx), static_cast<A*>(partial), rows, cols);
    sum_partials_kernel<A><<<grid_for(cols, kBlock), kBlock, 0, stream>>>(
        static_cast<const A*>(partial), static_cast<A*>(dweight), blocks, cols);
  });
}

}  // namespace engine::cuda
