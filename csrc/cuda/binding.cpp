// ATen binding of the CUDA kernels (built only in a CUDA build of engine._C): checks, the current
// stream, workspaces from torch's caching allocator, and the CUDA implementations of the engine::
// operators whose schemas engine/kernels/ops.py defines. The kernels (*.cu) see no torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

namespace k = engine::cuda;

k::DType tag(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::kFloat;
    case at::kDouble: return k::DType::kDouble;
    case at::kHalf: return k::DType::kHalf;
    case at::kBFloat16: return k::DType::kBFloat16;
    default: TORCH_CHECK(false, "engine::", op, ": unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "engine::", op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& weight_,
                                                double eps) {
  TORCH_CHECK(weight_.dim() == 1 && x_.size(-1) == weight_.numel(),
              "engine::rms_norm_fwd: weight must be [", x_.size(-1), "], got ", weight_.sizes());
  TORCH_CHECK(weight_.scalar_type() == x_.scalar_type(), "engine::rms_norm_fwd: weight dtype ",
              weight_.scalar_type(), " differs from x dtype ", x_.scalar_type());
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto weight = weight_.contiguous();
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  check(k::rms_norm_fwd(tag(x, "rms_norm_fwd"), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                        rstd.data_ptr(), rows, cols, eps, stream()),
        "rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                const at::Tensor& weight_,
                                                const at::Tensor& rstd_) {
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "engine::rms_norm_bwd: dy ", dy_.sizes(), " and x ",
              x_.sizes(), " differ");
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  auto weight = weight_.contiguous();
  auto rstd = rstd_.contiguous();
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == acc_dtype(x),
              "engine::rms_norm_bwd: rstd must hold ", rows, " ", acc_dtype(x), " values");
  auto dx = at::empty_like(x);
  auto partial = at::empty({k::rms_norm_bwd_blocks(rows), cols}, x.options().dtype(acc_dtype(x)));
  auto dweight = at::empty({cols}, x.options().dtype(acc_dtype(x)));
  check(k::rms_norm_bwd(tag(x, "rms_norm_bwd"), dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                        rstd.data_ptr(), dx.data_ptr(), partial.data_ptr(), dweight.data_ptr(),
                        rows, cols, stream()),
        "rms_norm_bwd");
  return {dx, dweight.to(weight.scalar_type())};
}

at::Tensor swiglu_fwd(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) % 2 == 0,
              "engine::swiglu_fwd: the last dimension must be even ([gate | up]), got ",
              x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  const int64_t cols = x.size(-1) / 2, rows = cols ? x.numel() / (2 * cols) : 0;
  auto shape = x.sizes().vec();
  shape.back() = cols;
  auto y = at::empty(shape, x.options());
  check(k::swiglu_fwd(tag(x, "swiglu_fwd"), x.data_ptr(), y.data_ptr(), rows, cols, stream()),
        "swiglu_fwd");
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy_, const at::Tensor& x_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  const int64_t cols = x.size(-1) / 2, rows = cols ? x.numel() / (2 * cols) : 0;
  TORCH_CHECK(dy_.numel() == rows * cols && dy_.size(-1) == cols, "engine::swiglu_bwd: dy ",
              dy_.sizes(), " does not match x ", x.sizes());
  auto dy = dy_.contiguous().to(x.scalar_type());
  auto dx = at::empty_like(x);
  check(k::swiglu_bwd(tag(x, "swiglu_bwd"), dy.data_ptr(), x.data_ptr(), dx.data_ptr(), rows,
                      cols, stream()),
        "swiglu_bwd");
  return dx;
}

at::Tensor rope(const at::Tensor& t_, const at::Tensor& freqs_, bool backward) {
  const char* op = backward ? "rope_bwd" : "rope_fwd";
  TORCH_CHECK(t_.dim() >= 2, "engine::", op, ": t must be [seq, ..., dim], got ", t_.sizes());
  const c10::cuda::CUDAGuard guard(t_.device());
  auto t = t_.contiguous();
  const int64_t seq = t.size(0), dim = t.size(-1), rot = freqs_.size(-1);
  const int64_t inner = seq * dim != 0 ? t.numel() / (seq * dim) : 0;
  TORCH_CHECK(rot % 2 == 0 && rot <= dim && freqs_.numel() == seq * rot, "engine::", op,
              ": freqs must be [", seq, ", 1, 1, rot] with an even rot <= ", dim, ", got ",
              freqs_.sizes());
  auto freqs = freqs_.reshape({seq, rot}).to(t.device(), acc_dtype(t)).contiguous();
  auto out = at::empty_like(t);
  check(k::rope(tag(t, op), t.data_ptr(), freqs.data_ptr(), out.data_ptr(), seq, inner, dim, rot,
                backward, stream()),
        op);
  return out;
}

at::Tensor rope_fwd(const at::Tensor& t, const at::Tensor& freqs) { return rope(t, freqs, false); }
at::Tensor rope_bwd(const at::Tensor& g, const at::Tensor& freqs) { return rope(g, freqs, true); }

at::Tensor xent(const at::Tensor& logits, const at::Tensor& target_,
                const std::optional<at::Tensor>& row_scale_, int64_t ignore_index, bool grad) {
  const char* op = grad ? "xent_fwd_bwd_" : "xent_fwd";
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "engine::", op,
              ": logits must be a contiguous [rows, vocab] tensor, got ", logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto target = target_.reshape({-1}).to(logits.device(), at::kLong).contiguous();
  TORCH_CHECK(target.numel() == rows, "engine::", op, ": ", rows, " rows but ", target.numel(),
              " targets");
  at::Tensor row_scale;
  if (row_scale_.has_value()) {
    row_scale = row_scale_->reshape({-1}).to(logits.device(), acc_dtype(logits)).contiguous();
    TORCH_CHECK(row_scale.numel() == rows, "engine::", op, ": row_scale must hold ", rows,
                " values");
  }
  auto loss = at::empty({rows}, logits.options().dtype(acc_dtype(logits)));
  check(k::xent(tag(logits, op), logits.data_ptr(), target.data_ptr<int64_t>(),
                row_scale.defined() ? row_scale.data_ptr() : nullptr, loss.data_ptr(), rows,
                vocab, ignore_index, grad, stream()),
        op);
  return loss;
}

at::Tensor xent_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  return xent(logits.contiguous(), target, std::nullopt, ignore_index, false);
}

at::Tensor xent_fwd_bwd_(at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& row_scale, int64_t ignore_index) {
  return xent(logits, target, row_scale, ignore_index, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("xent_fwd", &xent_fwd);
  m.impl("xent_fwd_bwd_", &xent_fwd_bwd_);
}
