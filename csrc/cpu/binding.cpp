// ATen binding of the CPU kernels: checks, dtype dispatch and the CPU implementations of the
// engine:: operators. The schemas are defined in Python (engine/kernels/ops.py) so that fake
// (meta) implementations exist whether or not this library is built; this file only registers
// kernels for them (TORCH_LIBRARY_IMPL), so loading it before the schemas is also fine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

namespace k = engine::cpu;

// The instruction set of the kernels: AVX2 + FMA where the CPU has both (x86-64), else the
// baseline build. ENGINE_CPU_ISA=base forces the baseline (to test it on an AVX2 machine).
bool use_avx2() {
#ifdef ENGINE_CPU_HAVE_AVX2
  static const bool avx2 = [] {
    const char* forced = std::getenv("ENGINE_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "base") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

#ifdef ENGINE_CPU_HAVE_AVX2
#define ENGINE_CPU_CALL(fn, ...) \
  (use_avx2() ? k::avx2::fn(__VA_ARGS__) : k::base::fn(__VA_ARGS__))
#else
#define ENGINE_CPU_CALL(fn, ...) k::base::fn(__VA_ARGS__)
#endif

template <typename S> struct Kernel { using type = S; };
template <> struct Kernel<at::BFloat16> { using type = k::bf16_t; };
template <> struct Kernel<at::Half> { using type = k::half_t; };

template <typename S> auto* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Kernel<S>::type*>(t.data_ptr<S>());
}

at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "engine::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

#define ENGINE_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& weight_,
                                                double eps) {
  check_cpu(x_, "rms_norm_fwd", "x");
  TORCH_CHECK(weight_.dim() == 1 && x_.size(-1) == weight_.numel(),
              "engine::rms_norm_fwd: weight must be [", x_.size(-1), "], got ", weight_.sizes());
  TORCH_CHECK(weight_.scalar_type() == x_.scalar_type(), "engine::rms_norm_fwd: weight dtype ",
              weight_.scalar_type(), " differs from x dtype ", x_.scalar_type());
  auto x = x_.contiguous();
  auto weight = weight_.contiguous();
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  ENGINE_DISPATCH(x.scalar_type(), "rms_norm_fwd", [&] {
    using T = typename Kernel<scalar_t>::type;
    ENGINE_CPU_CALL(rms_norm_fwd<T>, ptr<scalar_t>(x), ptr<scalar_t>(weight), ptr<scalar_t>(y),
                    rstd.data_ptr<k::acc_t<T>>(), rows, cols, eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                const at::Tensor& weight_,
                                                const at::Tensor& rstd_) {
  check_cpu(x_, "rms_norm_bwd", "x");
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "engine::rms_norm_bwd: dy ", dy_.sizes(),
              " and x ", x_.sizes(), " differ");
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  auto weight = weight_.contiguous();
  auto rstd = rstd_.contiguous();
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == acc_dtype(x),
              "engine::rms_norm_bwd: rstd must hold ", rows, " ", acc_dtype(x), " values");
  auto dx = at::empty_like(x);
  auto dweight = at::empty({cols}, x.options().dtype(acc_dtype(x)));
  ENGINE_DISPATCH(x.scalar_type(), "rms_norm_bwd", [&] {
    using T = typename Kernel<scalar_t>::type;
    ENGINE_CPU_CALL(rms_norm_bwd<T>, ptr<scalar_t>(dy), ptr<scalar_t>(x), ptr<scalar_t>(weight),
                    rstd.data_ptr<k::acc_t<T>>(), ptr<scalar_t>(dx),
                    dweight.data_ptr<k::acc_t<T>>(), rows, cols);
  });
  return {dx, dweight.to(weight.scalar_type())};
}

at::Tensor swiglu_fwd(const at::Tensor& x_) {
  check_cpu(x_, "swiglu_fwd", "x");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) % 2 == 0,
              "engine::swiglu_fwd: the last dimension must be even ([gate | up]), got ",
              x_.sizes());
  auto x = x_.contiguous();
  const int64_t cols = x.size(-1) / 2, rows = cols ? x.numel() / (2 * cols) : 0;
  auto shape = x.sizes().vec();
  shape.back() = cols;
  auto y = at::empty(shape, x.options());
  ENGINE_DISPATCH(x.scalar_type(), "swiglu_fwd", [&] {
    using T = typename Kernel<scalar_t>::type;
    ENGINE_CPU_CALL(swiglu_fwd<T>, ptr<scalar_t>(x), ptr<scalar_t>(y), rows, cols);
  });
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy_, const at::Tensor& x_) {
  check_cpu(x_, "swiglu_bwd", "x");
  auto x = x_.contiguous();
  const int64_t cols = x.size(-1) / 2, rows = cols ? x.numel() / (2 * cols) : 0;
  TORCH_CHECK(dy_.numel() == rows * cols && dy_.size(-1) == cols,
              "engine::swiglu_bwd: dy ", dy_.sizes(), " does not match x ", x.sizes());
  auto dy = dy_.contiguous().to(x.scalar_type());
  auto dx = at::empty_like(x);
  ENGINE_DISPATCH(x.scalar_type(), "swiglu_bwd", [&] {
    using T = typename Kernel<scalar_t>::type;
    ENGINE_CPU_CALL(swiglu_bwd<T>, ptr<scalar_t>(dy), ptr<scalar_t>(x), ptr<scalar_t>(dx), rows,
                    cols);
  });
  return dx;
}

at::Tensor rope(const at::Tensor& t_, const at::Tensor& freqs_, bool backward) {
  const char* op = backward ? "rope_bwd" : "rope_fwd";
  check_cpu(t_, op, "t");
  TORCH_CHECK(t_.dim() >= 2, "engine::", op, ": t must be [seq, ..., dim], got ", t_.sizes());
  auto t = t_.contiguous();
  const int64_t seq = t.size(0), dim = t.size(-1), rot = freqs_.size(-1);
  const int64_t inner = seq * dim != 0 ? t.numel() / (seq * dim) : 0;
  TORCH_CHECK(rot % 2 == 0 && rot <= dim && freqs_.numel() == seq * rot,
              "engine::", op, ": freqs must be [", seq, ", 1, 1, rot] with an even rot <= ", dim,
              ", got ", freqs_.sizes());
  auto freqs = freqs_.reshape({seq, rot}).to(acc_dtype(t)).contiguous();
  auto out = at::empty_like(t);
  ENGINE_DISPATCH(t.scalar_type(), "rope", [&] {
    using T = typename Kernel<scalar_t>::type;
    ENGINE_CPU_CALL(rope<T>, ptr<scalar_t>(t), freqs.data_ptr<k::acc_t<T>>(), ptr<scalar_t>(out),
                    seq, inner, dim, rot, backward);
  });
  return out;
}

at::Tensor rope_fwd(const at::Tensor& t, const at::Tensor& freqs) { return rope(t, freqs, false); }
at::Tensor rope_bwd(const at::Tensor& g, const at::Tensor& freqs) { return rope(g, freqs, true); }

at::Tensor xent(const at::Tensor& logits, const at::Tensor& target_,
                const std::optional<at::Tensor>& row_scale_, int64_t ignore_index, bool grad) {
  const char* op = grad ? "xent_fwd_bwd_" : "xent_fwd";
  check_cpu(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "engine::", op,
              ": logits must be a contiguous [rows, vocab] tensor, got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto target = target_.reshape({-1}).to(at::kLong).contiguous();
  TORCH_CHECK(target.numel() == rows, "engine::", op, ": ", rows, " rows but ", target.numel(),
              " targets");
  if (rows) {
    auto valid = ((target >= 0) & (target < vocab)) | (target == ignore_index);
    TORCH_CHECK(valid.all().item<bool>(), "engine::", op, ": targets must be in [0, ", vocab,
                ") or ignore_index=", ignore_index);
  }
  at::Tensor row_scale;
  if (row_scale_.has_value()) {
    row_scale = row_scale_->reshape({-1}).to(acc_dtype(logits)).contiguous();
    TORCH_CHECK(row_scale.numel() == rows, "engine::", op, ": row_scale must hold ", rows,
                " values");
  }
  auto loss = at::empty({rows}, logits.options().dtype(acc_dtype(logits)));
  ENGINE_DISPATCH(logits.scalar_type(), "xent", [&] {
    using T = typename Kernel<scalar_t>::type;
    using A = k::acc_t<T>;
    ENGINE_CPU_CALL(xent<T>, ptr<scalar_t>(logits), target.data_ptr<int64_t>(),
                    row_scale.defined() ? row_scale.data_ptr<A>() : nullptr, loss.data_ptr<A>(),
                    rows, vocab, ignore_index, grad);
  });
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

// For engine.kernels.ops.cpu_isa() (ctypes): which build of the kernels runs here.
extern "C" const char* engine_cpu_isa() { return use_avx2() ? "avx2" : "base"; }

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("xent_fwd", &xent_fwd);
  m.impl("xent_fwd_bwd_", &xent_fwd_bwd_);
}
