#pragma once
/// @file adamw.hpp
/// @brief AdamW<Scalar>: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
/// Regularization", ICLR 2019) and bias correction (Kingma & Ba 2015).
///
/// For step t = 1, 2, ... and every element, with g the gradient and lr this step's learning rate:
///
///     m_t = β1 m_{t-1} + (1 - β1) g
///     v_t = β2 v_{t-1} + (1 - β2) g²
///     m̂ = m_t / (1 - β1^t),   v̂ = v_t / (1 - β2^t)
///     θ_t = θ_{t-1} - lr (m̂ / (√v̂ + ε) + λ θ_{t-1})
///
/// The decay λ θ_{t-1} is decoupled from the gradient (it never enters m or v) and is scaled by lr, as in
/// torch.optim.AdamW; the paper's schedule multiplier η_t is the caller's learning-rate schedule. The arithmetic is
/// done in double per element; m and v are stored in Scalar. step() reads p.grad and never zeroes it.
///
/// @code
/// tmoe::train::AdamW<float> opt(params, {.lr = 1e-3, .weight_decay = 0.01});
/// tmoe::train::InverseSqrtSchedule lr(1e-3, 4000);
/// // after backward:
/// opt.step(ctx, lr(opt.step_count() + 1));
/// tmoe::nn::zero_grad(params);
/// @endcode

#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/parameter.hpp"
#include "tmoe/train/optimizer_state.hpp"

namespace tmoe::train {

/// AdamW hyper-parameters (designated initializers).
struct AdamWOptions {
  double lr = 1e-3;           ///< used by step(ctx); step(ctx, lr) overrides it
  double beta1 = 0.9;         ///< in [0, 1)
  double beta2 = 0.999;       ///< in [0, 1)
  double eps = 1e-8;          ///< > 0, added to √v̂
  double weight_decay = 0.0;  ///< λ >= 0, decoupled, multiplied by lr
};

namespace detail {
/// The constructor checks of every AdamW: parameter names and shapes, then each option's range.
template <class Scalar, DeviceTag Device>
void check_adamw(const nn::ParameterRefs<Scalar, Device>& params, const AdamWOptions& options) {
  static constexpr std::string_view kOp = "AdamW";
  check_parameters(kOp, params);
  check_non_negative(kOp, "lr", options.lr);
  check_half_open(kOp, "beta1", options.beta1);
  check_half_open(kOp, "beta2", options.beta2);
  check_positive(kOp, "eps", options.eps);
  check_non_negative(kOp, "weight_decay", options.weight_decay);
}
}  // namespace detail

/// AdamW over a list of parameters on `Device`: the CPU one below, the CUDA one in train/cuda_adamw.cuh.
/// @tparam Scalar float or double.
template <std::floating_point Scalar, DeviceTag Device = Cpu>
class AdamW;

/// AdamW over a list of CPU parameters. Holds views of the parameters; they must outlive the optimizer.
/// State buffers (Scalar, same shapes as the parameters): "{prefix}{name}.adam_m", "{prefix}{name}.adam_v".
template <std::floating_point Scalar>
class AdamW<Scalar, Cpu> {
 public:
  static constexpr std::string_view kType = "adamw";

  /// @throws Error for an empty or repeated parameter name or an option out of range; ShapeError when a
  /// gradient's shape differs from its value's.
  explicit AdamW(nn::ParameterRefs<Scalar, Cpu> params, AdamWOptions options = {})
      : params_(std::move(params)), options_(options) {
    detail::check_adamw(params_, options_);
    m_.reserve(params_.size());
    v_.reserve(params_.size());
    for (const auto& p : params_) {
      m_.emplace_back(p.value.shape());
      v_.emplace_back(p.value.shape());
    }
  }

  /// One update with options().lr.
  void step(CpuContext& ctx) { step(ctx, options_.lr); }

  /// One update with learning rate `lr` (e.g. a schedule's value at step_count() + 1).
  /// @throws Error if lr is negative or not finite (before anything changes).
  void step(CpuContext& ctx, double lr) {
    detail::check_non_negative("AdamW::step", "lr", lr);
    ++step_;
    const double b1 = options_.beta1, b2 = options_.beta2, eps = options_.eps, wd = options_.weight_decay;
    const double t = static_cast<double>(step_);
    const double bc1 = 1.0 - std::pow(b1, t);
    const double bc2 = 1.0 - std::pow(b2, t);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Scalar* theta = params_[k].value.data();
      const Scalar* grad = params_[k].grad.data();
      Scalar* m = m_[k].data();
      Scalar* v = v_[k].data();
      ctx.parallel_range(params_[k].value.numel(), 1024, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) {
          const double g = static_cast<double>(grad[i]);
          const double mi = b1 * static_cast<double>(m[i]) + (1.0 - b1) * g;
          const double vi = b2 * static_cast<double>(v[i]) + (1.0 - b2) * g * g;
          m[i] = static_cast<Scalar>(mi);
          v[i] = static_cast<Scalar>(vi);
          const double p = static_cast<double>(theta[i]);
          const double update = (mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * p;
          theta[i] = static_cast<Scalar>(p - lr * update);
        }
      });
    }
  }

  /// Steps taken so far (the t of the last step; 0 before the first).
  [[nodiscard]] std::int64_t step_count() const noexcept { return step_; }
  [[nodiscard]] const AdamWOptions& options() const noexcept { return options_; }
  [[nodiscard]] const nn::ParameterRefs<Scalar, Cpu>& parameters() const noexcept { return params_; }

  /// The buffers as named views ("{prefix}{name}.adam_m", then ".adam_v", parameters in order) and the metadata
  /// "{prefix}step", "{prefix}type" = "adamw". Writing into the views (e.g. by io::load) restores the buffers.
  [[nodiscard]] OptimizerState<Scalar> state(std::string_view prefix = "optimizer.") {
    OptimizerState<Scalar> s;
    s.tensors.reserve(2 * params_.size());
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const std::string base = std::string(prefix) + params_[k].name;
      s.tensors.push_back({base + ".adam_m", m_[k].view()});
      s.tensors.push_back({base + ".adam_v", v_[k].view()});
    }
    s.metadata = detail::state_metadata(kType, step_, prefix);
    return s;
  }

  /// Restores the step counter from checkpoint metadata (after the buffers were loaded into state(prefix).tensors).
  /// @throws Error if "{prefix}step" is missing or malformed or "{prefix}type" is not "adamw".
  void load_metadata(const std::map<std::string, std::string>& metadata, std::string_view prefix = "optimizer.") {
    step_ = detail::parse_state_metadata("AdamW::load_metadata", kType, metadata, prefix);
  }

  /// Restores buffers and step counter from named tensors (e.g. another optimizer's state()). Everything is
  /// checked before anything is written. Tensors in `tensors` not starting with a non-empty `prefix` are ignored.
  /// @throws Error for a missing tensor, an unexpected "{prefix}..." tensor or bad metadata; ShapeError naming the
  /// tensor whose shape differs.
  template <class T>
  requires std::same_as<std::remove_const_t<T>, Scalar>
  void load_state(const NamedTensorViews<T, Cpu>& tensors, const std::map<std::string, std::string>& metadata,
                  std::string_view prefix = "optimizer.") {
    const std::int64_t step = detail::parse_state_metadata("AdamW::load_state", kType, metadata, prefix);
    detail::copy_state("AdamW::load_state", state(prefix).tensors, tensors, prefix);
    step_ = step;
  }

 private:
  nn::ParameterRefs<Scalar, Cpu> params_;
  AdamWOptions options_;
  std::vector<Tensor<Scalar, Cpu>> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace tmoe::train
