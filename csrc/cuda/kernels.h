// CUDA kernels of the engine:: operators, callable from the ATen binding (binding.cpp) without
// either side seeing the other's headers: raw pointers, a dtype tag, the caller's stream. Each
// launcher returns the launch's cudaError_t. Layouts are those of csrc/cpu/kernels.h; "acc" is
// float for float/half/bf16 and double for double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace engine::cuda {

enum class DType : int { kFloat, kDouble, kHalf, kBFloat16 };

cudaError_t rms_norm_fwd(DType dtype, const void* x, const void* weight, void* y, void* rstd,
                         int64_t rows, int64_t cols, double eps, cudaStream_t stream);

// Blocks the backward launches; the caller allocates `partial` as [blocks, cols] acc values.
int64_t rms_norm_bwd_blocks(int64_t rows);

// dweight (acc, [cols]) is the sum of the per-block partial rows.
cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const void* weight,
                         const void* rstd, void* dx, void* partial, void* dweight, int64_t rows,
                         int64_t cols, cudaStream_t stream);

cudaError_t swiglu_fwd(DType dtype, const void* x, void* y, int64_t rows, int64_t cols,
                       cudaStream_t stream);

cudaError_t swiglu_bwd(DType dtype, const void* dy, const void* x, void* dx, int64_t rows,
                       int64_t cols, cudaStream_t stream);

// freqs: [seq, rot] acc values.
cudaError_t rope(DType dtype, const void* t, const void* freqs, void* out, int64_t seq,
                 int64_t inner, int64_t dim, int64_t rot, bool backward, cudaStream_t stream);

// loss: [rows] acc; row_scale: [rows] acc or null. A target outside [0, vocab) that is not
// ignore_index gives a NaN loss for its row (the kernel cannot raise).
cudaError_t xent(DType dtype, void* logits, const int64_t* target, const void* row_scale,
                 void* loss, int64_t rows, int64_t vocab, int64_t ignore_index, bool grad,
                 cudaStream_t stream);

}  // namespace engine::cuda
