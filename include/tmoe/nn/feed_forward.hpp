#pragma once
/// @file feed_forward.hpp
/// @brief nn::FeedForward<Act>: the dense Transformer FFN, y = wo(Act(wi(x))), C -> F -> C, and its backward.
///
/// Gradient rule: backward ACCUMULATES into the parameter gradients and OVERWRITES dx.
///
/// Parameters, relative to the prefix: `wi.weight` (F, C), `wi.bias` (F), `wo.weight` (C, F), `wo.bias` (C);
/// the biases only when enabled.
///
/// @code
/// tmoe::CpuContext ctx{2};
/// tmoe::nn::FeedForward<tmoe::nn::Relu, float, tmoe::Cpu> ffn({.d_model = 512, .d_ff = 2048});
/// ffn.init(3);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), y({8, 128, 512});
/// decltype(ffn)::Cache cache;
/// ffn.forward(ctx, x, y, cache);
/// @endcode

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/detail/nn_shapes.hpp"
#include "tmoe/nn/activation.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/linear.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// Sizes of a FeedForward.
struct FeedForwardOptions {
  std::int64_t d_model = 0;  ///< C
  std::int64_t d_ff = 0;     ///< F
  bool bias = true;          ///< biases in wi and wo
};

/// What FeedForward::backward needs: both Linear caches and the pre-activation.
template <class Scalar, DeviceTag Device>
struct FeedForwardCache {
  LinearCache<Scalar, Device> wi;
  LinearCache<Scalar, Device> wo;  // views `hidden`
  Tensor<Scalar, Device> pre;      // (N, F) wi(x)
  Tensor<Scalar, Device> hidden;   // (N, F) Act(pre)
  Tensor<Scalar, Device> dhidden;  // (N, F) backward workspace
};

template <Activation Act, class Scalar, DeviceTag Device>
class FeedForward;

/// @tparam Act an activation policy (Relu, Gelu, Silu).
/// @tparam Scalar float or double.
template <Activation Act, class Scalar>
class FeedForward<Act, Scalar, Cpu> {
 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using activation_type = Act;
  using Cache = FeedForwardCache<Scalar, Cpu>;

  FeedForward() = default;

  /// @throws ShapeError if d_model or d_ff is not positive.
  explicit FeedForward(FeedForwardOptions options)
      : options_(options),
        wi_(checked(options).d_model, options.d_ff, options.bias),
        wo_(options.d_ff, options.d_model, options.bias) {}

  [[nodiscard]] const FeedForwardOptions& options() const noexcept { return options_; }
  [[nodiscard]] Linear<Scalar, Cpu>& wi() noexcept { return wi_; }
  [[nodiscard]] Linear<Scalar, Cpu>& wo() noexcept { return wo_; }

  /// wi from sub_seed(seed, 0), wo from sub_seed(seed, 1); each with Linear::init.
  void init(std::uint64_t seed) {
    wi_.init(sub_seed(seed, 0));
    wo_.init(sub_seed(seed, 1));
  }

  /// "{prefix}.wi.weight", "{prefix}.wi.bias", "{prefix}.wo.weight", "{prefix}.wo.bias" values.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return values_of(parameter_refs(prefix));
  }

  /// Values and gradients under the same names as parameters().
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    ParameterRefs<Scalar, Cpu> out = wi_.parameter_refs(p + "wi");
    for (auto& r : wo_.parameter_refs(p + "wo")) out.push_back(std::move(r));
    return out;
  }

  /// y (..., C) = wo(Act(wi(x (..., C)))).
  /// @throws ShapeError if x's last dim is not C or y's shape differs from x's.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& cache) const {
    const char* op = "FeedForward::forward";
    if (x.rank() == 0 || x.dim(-1) != options_.d_model) {
      std::string m = op;
      m += ": x must have last dim d_model = ";
      m += std::to_string(options_.d_model);
      m += ", got shape ";
      m += x.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "y", y, x.shape());
    const Shape hidden_shape = detail::with_last_dim(x.shape(), options_.d_ff);
    cache.pre.resize(hidden_shape);
    cache.hidden.resize(hidden_shape);
    wi_.forward(ctx, x, cache.pre, cache.wi);
    Ops<Cpu>::activation<Act, Scalar>(ctx, cache.hidden, cache.pre);
    wo_.forward(ctx, cache.hidden, y, cache.wo);
  }

  /// dx (..., C) overwritten; wi and wo gradients accumulated.
  /// @throws ShapeError if forward has not filled `cache` or dy / dx do not have the input's shape.
  void backward(CpuContext& ctx, Cache& cache, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx) {
    const char* op = "FeedForward::backward";
    if (cache.wi.x.rank() == 0) throw ShapeError(std::string(op) + ": the cache holds no input; call forward first");
    require_shape(op, "dy", dy, cache.wi.x.shape());
    require_shape(op, "dx", dx, cache.wi.x.shape());
    cache.dhidden.resize(cache.hidden.shape());
    wo_.backward(ctx, cache.wo, dy, cache.dhidden);
    Ops<Cpu>::activation_backward<Act, Scalar>(ctx, cache.dhidden, cache.dhidden, cache.pre);
    wi_.backward(ctx, cache.wi, cache.dhidden, dx);
  }

 private:
  static const FeedForwardOptions& checked(const FeedForwardOptions& o) {
    if (o.d_model <= 0 || o.d_ff <= 0) {
      std::string m = "FeedForward: d_model and d_ff must be positive, got d_model ";
      m += std::to_string(o.d_model);
      m += " and d_ff ";
      m += std::to_string(o.d_ff);
      throw ShapeError(m);
    }
    return o;
  }

  FeedForwardOptions options_;
  Linear<Scalar, Cpu> wi_;  // C -> F
  Linear<Scalar, Cpu> wo_;  // F -> C
};

}  // namespace tmoe::nn
