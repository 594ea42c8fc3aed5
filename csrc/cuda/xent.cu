// Per-row softmax cross-entropy fused with its gradient on CUDA (semantics of
// csrc/cpu/xent.cpp): one block per row; an online max/sum-of-exponentials pass, a block
// reduction of the (max, sum) pairs, then the in-place (softmax - onehot) * row_scale pass.
#include "common.cuh"

namespace engine::cuda {
namespace {

template <typename T>
__global__ void xent_kernel(T* __restrict__ logits, const int64_t* __restrict__ target,
                            const acc_t<T>* __restrict__ row_scale, acc_t<T>* __restrict__ loss,
                            int64_t vocab, int64_t ignore_index, bool grad) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  T* x = logits + r * vocab;
  A m = A(-INFINITY), s = A(0);  // this thread's running max and sum of exp(x - m)
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    A xv = load(x[v]);
    if (xv > m) {
      s = s * exp_acc(m - xv) + A(1);
      m = xv;
    } else {
      s += exp_acc(xv - m);
    }
  }
  const A mx = block_max(m);
  s = m == A(-INFINITY) ? A(0) : s * exp_acc(m - mx);
  const A sum = block_sum(s);
  const int64_t tgt = target[r];
  const bool ignored = tgt == ignore_index;
  const bool valid = ignored || (tgt >= 0 && tgt < vocab);
  const A lse = mx + log_acc(sum);
  if (threadIdx.x == 0) {
    loss[r] = !valid ? A(NAN) : (ignored ? A(0) : lse - load(x[tgt]));
  }
  if (!grad) return;
  __syncthreads();  // x[tgt] is read above before any thread overwrites it
  const A scale = (ignored || !valid) ? A(0) : (row_scale ? A(row_scale[r]) : A(1));
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    A p = exp_acc(load(x[v]) - lse) * scale;
    if (v == tgt) p -= scale;
    x[v] = store<T>(p);
  }
}

}  // namespace

cudaError_t xent(DType dtype, void* logits, const int64_t* target, const void* row_scale,
                 void* loss, int64_t rows, int64_t vocab, int64_t ignore_index, bool grad,
                 cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    xent_kernel<T><<<unsigned(rows), kBlock * 2, 0, stream>>>(
        static_cast<T*>(logits), target, static_cast<const A*>(row_scale), static_cast<A*>(loss),
        vocab, ignore_index, grad);
  });
}

}  // namespace engine::cuda
