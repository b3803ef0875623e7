#pragma once
/// @file layer_norm.hpp
/// @brief nn::LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta (biased
/// variance, as in PyTorch), and its backward.
///
/// Gradient rule: backward ACCUMULATES into the gamma and beta gradients and OVERWRITES dx.
///
/// Parameters, relative to the prefix: `weight` (C) = gamma and `bias` (C) = beta (PyTorch's names).
///
/// @code
/// tmoe::CpuContext ctx;
/// tmoe::nn::LayerNorm<float, tmoe::Cpu> ln(/*C=*/512);   // eps 1e-5; init() sets gamma = 1, beta = 0
/// ln.init(0);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), y({8, 128, 512});
/// tmoe::nn::LayerNorm<float, tmoe::Cpu>::Cache cache;
/// ln.forward(ctx, x, y, cache);
/// @endcode

#include <cstdint>
#include <string>
#include <type_traits>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// What LayerNorm::backward needs: a view of the input (kept alive by the caller) and per-row statistics.
template <class Scalar, DeviceTag Device>
struct LayerNormCache {
  ConstTensorView<Scalar, Device> x;  // (..., C)
  Tensor<Scalar, Device> mean;        // (N) N = rows of x
  Tensor<Scalar, Device> rstd;        // (N) 1 / sqrt(var + eps)
};

template <class Scalar, DeviceTag Device>
class LayerNorm;

/// Layer normalization over the last dimension C, with learned gamma and beta.
/// @tparam Scalar float or double.
template <class Scalar>
class LayerNorm<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::LayerNorm<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = LayerNormCache<Scalar, Cpu>;

  LayerNorm() = default;

  /// Allocates gamma = 1 and beta = 0 over C features.
  /// @throws ShapeError if C is not positive or eps is negative.
  explicit LayerNorm(std::int64_t d_model, Scalar eps = Scalar(1e-5)) : c_(d_model), eps_(eps) {
    if (d_model <= 0 || !(eps >= Scalar(0))) {
      std::string m = "LayerNorm: d_model must be positive and eps non-negative, got d_model ";
      m += std::to_string(d_model);
      m += " and eps ";
      m += std::to_string(static_cast<double>(eps));
      throw ShapeError(m);
    }
    gamma_ = Parameter<Scalar, Cpu>({d_model});
    beta_ = Parameter<Scalar, Cpu>({d_model});
    init(0);
  }

  [[nodiscard]] std::int64_t d_model() const noexcept { return c_; }
  [[nodiscard]] Scalar eps() const noexcept { return eps_; }
  [[nodiscard]] TensorView<Scalar, Cpu> weight() noexcept { return gamma_.value.view(); }  // gamma (C)
  [[nodiscard]] TensorView<Scalar, Cpu> bias() noexcept { return beta_.value.view(); }     // beta (C)

  /// gamma = 1, beta = 0. Deterministic; the seed is accepted for a uniform layer interface.
  void init(std::uint64_t /*seed*/) {
    fill_constant(gamma_.value.view(), Scalar(1));
    fill_constant(beta_.value.view(), Scalar(0));
  }

  /// "{prefix}.weight" (gamma) and "{prefix}.bias" (beta) values.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return values_of(parameter_refs(prefix));
  }

  /// Values and gradients under the same names as parameters().
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    ParameterRefs<Scalar, Cpu> out;
    out.push_back({p + "weight", gamma_.value.view(), gamma_.grad.view()});
    out.push_back({p + "bias", beta_.value.view(), beta_.grad.view()});
    return out;
  }

  /// y (..., C) = LayerNorm(x (..., C)). `y` may alias `x` only if backward is not needed.
  /// @throws ShapeError if x's last dim is not C or y's shape differs from x's.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& cache) const {
    const char* op = "LayerNorm::forward";
    if (x.rank() == 0 || x.dim(-1) != c_) {
      std::string m = op;
      m += ": x must have last dim d_model = ";
      m += std::to_string(c_);
      m += ", got shape ";
      m += x.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "y", y, x.shape());
    const std::int64_t N = x.numel() / c_;
    cache.mean.resize({N});
    cache.rstd.resize({N});
    Ops<Cpu>::layernorm<Scalar>(ctx, y, cache.mean, cache.rstd, x, gamma_.value, beta_.value, eps_);
    cache.x = x;
  }

  /// dx (..., C) = dLayerNorm/dx^T dy (overwritten); dgamma += sum dy * xhat; dbeta += sum dy.
  /// @throws ShapeError if forward has not filled `cache` or dy / dx do not have the input's shape.
  void backward(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx) {
    const char* op = "LayerNorm::backward";
    if (cache.x.rank() == 0) throw ShapeError(std::string(op) + ": the cache holds no input; call forward first");
    require_shape(op, "dy", dy, cache.x.shape());
    require_shape(op, "dx", dx, cache.x.shape());
    Ops<Cpu>::layernorm_backward<Scalar>(ctx, dx, gamma_.grad, beta_.grad, dy, cache.x, cache.mean, cache.rstd,
                                         gamma_.value);
  }

 private:
  std::int64_t c_ = 0;
  Scalar eps_ = Scalar(1e-5);
  Parameter<Scalar, Cpu> gamma_;  // (C)
  Parameter<Scalar, Cpu> beta_;   // (C)
};

}  // namespace tmoe::nn
