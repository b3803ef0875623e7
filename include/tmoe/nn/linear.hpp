#pragma once
/// @file linear.hpp
/// @brief nn::Linear: y = x W^T + b with W stored (out, in) as in PyTorch, and its backward.
///
/// Gradient rule (as for every nn layer): backward ACCUMULATES into the parameter gradients (`+=`, until
/// zero_grad) and OVERWRITES the input gradient dx.
///
/// Parameters, relative to the prefix: `weight` (out, in) and, when enabled, `bias` (out).
///
/// @code
/// tmoe::CpuContext ctx{2};
/// tmoe::nn::Linear<float, tmoe::Cpu> proj(/*in=*/512, /*out=*/2048);
/// proj.init(/*seed=*/1);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), y({8, 128, 2048}), dy({8, 128, 2048}), dx({8, 128, 512});
/// tmoe::nn::Linear<float, tmoe::Cpu>::Cache cache;
/// proj.forward(ctx, x, y, cache);
/// proj.backward(ctx, cache, dy, dx);   // proj.parameter_refs("ffn.wi") now holds dW and db
/// @endcode

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/detail/nn_shapes.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// What Linear::backward needs: a view of forward's input, which the caller keeps alive until backward.
template <class Scalar, DeviceTag Device>
struct LinearCache {
  ConstTensorView<Scalar, Device> x;  // (..., in)
};

template <class Scalar, DeviceTag Device>
class Linear;

/// A dense affine map over the last dimension: (..., in) -> (..., out).
/// @tparam Scalar float or double.
template <class Scalar>
class Linear<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::Linear<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = LinearCache<Scalar, Cpu>;

  Linear() = default;

  /// Allocates zero-filled W (out, in) and, if `bias`, b (out).
  /// @throws ShapeError if in_features or out_features is not positive.
  Linear(std::int64_t in_features, std::int64_t out_features, bool bias = true)
      : in_(in_features), out_(out_features), has_bias_(bias) {
    if (in_features <= 0 || out_features <= 0) {
      std::string m = "Linear: in_features and out_features must be positive, got in_features ";
      m += std::to_string(in_features);
      m += " and out_features ";
      m += std::to_string(out_features);
      throw ShapeError(m);
    }
    weight_ = Parameter<Scalar, Cpu>({out_features, in_features});
    if (bias) bias_ = Parameter<Scalar, Cpu>({out_features});
  }

  [[nodiscard]] std::int64_t in_features() const noexcept { return in_; }
  [[nodiscard]] std::int64_t out_features() const noexcept { return out_; }
  [[nodiscard]] bool has_bias() const noexcept { return has_bias_; }
  [[nodiscard]] TensorView<Scalar, Cpu> weight() noexcept { return weight_.value.view(); }  // (out, in)
  [[nodiscard]] TensorView<Scalar, Cpu> bias() noexcept { return bias_.value.view(); }      // (out), empty if none

  /// PyTorch's default: W and b ~ U(-1/sqrt(in), 1/sqrt(in)), from Philox(seed) streams 0 (W) and 1 (b).
  void init(std::uint64_t seed) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
    fill_uniform(weight_.value.view(), seed, 0, bound);
    if (has_bias_) fill_uniform(bias_.value.view(), seed, 1, bound);
  }

  /// "{prefix}.weight" and "{prefix}.bias" values, for io::save / io::load.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return values_of(parameter_refs(prefix));
  }

  /// Values and gradients under the same names as parameters().
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    ParameterRefs<Scalar, Cpu> out;
    out.push_back({p + "weight", weight_.value.view(), weight_.grad.view()});
    if (has_bias_) out.push_back({p + "bias", bias_.value.view(), bias_.grad.view()});
    return out;
  }

  /// y (..., out) = x (..., in) W^T + b. Keeps a view of x in `cache`.
  /// @throws ShapeError if x's last dim is not in_features or y's shape is not x's with last dim out_features.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& cache) const {
    const char* op = "Linear::forward";
    if (x.rank() == 0 || x.dim(-1) != in_) {
      std::string m = op;
      m += ": x must have last dim in_features = ";
      m += std::to_string(in_);
      m += ", got shape ";
      m += x.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "y", y, detail::with_last_dim(x.shape(), out_));
    const std::int64_t N = x.numel() / in_;
    Ops<Cpu>::gemm<Scalar>(ctx, y.reshape({N, out_}), x.reshape({N, in_}), Trans::kN, weight_.value, Trans::kT);
    if (has_bias_) Ops<Cpu>::add_row_vector<Scalar>(ctx, y, bias_.value);
    cache.x = x;
  }

  /// dW (out, in) += dy^T x;  db (out) += sum over rows of dy;  dx (..., in) = dy W (overwritten).
  /// @throws ShapeError if forward has not filled `cache`, or dy / dx do not match forward's output / input.
  void backward(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx) {
    const char* op = "Linear::backward";
    if (cache.x.rank() == 0) throw ShapeError(std::string(op) + ": the cache holds no input; call forward first");
    require_shape(op, "dy", dy, detail::with_last_dim(cache.x.shape(), out_));
    require_shape(op, "dx", dx, cache.x.shape());
    const std::int64_t N = cache.x.numel() / in_;
    const auto dy2 = dy.reshape({N, out_});
    Ops<Cpu>::gemm<Scalar>(ctx, weight_.grad, dy2, Trans::kT, cache.x.reshape({N, in_}), Trans::kN, Scalar(1),
                           Scalar(1));
    if (has_bias_) Ops<Cpu>::row_sum_accumulate<Scalar>(ctx, bias_.grad, dy2);
    Ops<Cpu>::gemm<Scalar>(ctx, dx.reshape({N, in_}), dy2, Trans::kN, weight_.value, Trans::kN);
  }

 private:
  std::int64_t in_ = 0, out_ = 0;
  bool has_bias_ = true;
  Parameter<Scalar, Cpu> weight_;  // (out, in)
  Parameter<Scalar, Cpu> bias_;    // (out)
};

}  // namespace tmoe::nn
