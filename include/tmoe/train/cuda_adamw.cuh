#pragma once
/// @file cuda_adamw.cuh
/// @brief AdamW<Scalar, Cuda>: the update of train/adamw.hpp on device parameters, one kernel per parameter.
///
/// Every element runs the CPU optimizer's double-precision arithmetic operation for operation, each rounded on its
/// own (the _rn intrinsics keep nvcc from fusing a multiply and an add), and the bias corrections come from the
/// host's std::pow. So with the CPU build's default (no FMA contraction, as in the tests' portable flags) the two
/// back-ends produce the same parameters and buffers bit for bit.
///
/// @code
/// tmoe::train::AdamW<float, tmoe::Cuda> opt(layer.parameter_refs(), {.lr = 1e-3, .weight_decay = 0.01});
/// opt.step(ctx, schedule(opt.step_count() + 1));   // reads the gradients, never zeroes them
/// tmoe::train::zero_grad(ctx, layer.parameter_refs());
/// @endcode

#include <cuda_runtime.h>

#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/backend/cuda/storage.cuh"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/parameter.hpp"
#include "tmoe/train/adamw.hpp"
#include "tmoe/train/optimizer_state.hpp"

namespace tmoe::train {

namespace cuda_kernels {

/// The constants of one AdamW step, computed on the host.
struct AdamWStep {
  double b1, one_minus_b1, b2, one_minus_b2, bc1, bc2, eps, wd, lr;
};

template <class S>
__global__ void adamw_kernel(S* __restrict__ theta, const S* __restrict__ grad, S* __restrict__ m,
                             S* __restrict__ v, std::int64_t n, AdamWStep c) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const double g = static_cast<double>(grad[i]);
    const double mi = __dadd_rn(__dmul_rn(c.b1, static_cast<double>(m[i])), __dmul_rn(c.one_minus_b1, g));
    const double vi = __dadd_rn(__dmul_rn(c.b2, static_cast<double>(v[i])), __dmul_rn(__dmul_rn(c.one_minus_b2, g), g));
    m[i] = static_cast<S>(mi);
    v[i] = static_cast<S>(vi);
    const double p = static_cast<double>(theta[i]);
    const double denom = __dadd_rn(__dsqrt_rn(__ddiv_rn(vi, c.bc2)), c.eps);
    const double update = __dadd_rn(__ddiv_rn(__ddiv_rn(mi, c.bc1), denom), __dmul_rn(c.wd, p));
    theta[i] = static_cast<S>(__dsub_rn(p, __dmul_rn(c.lr, update)));
  }
}

}  // namespace cuda_kernels

/// Zeroes the gradients of device parameters, on the context's stream.
template <class Scalar>
void zero_grad(CudaContext& ctx, const nn::ParameterRefs<Scalar, Cuda>& params) {
  for (const auto& p : params) {
    if (p.grad.numel() == 0) continue;
    TMOE_CUDA_CHECK(cudaMemsetAsync(p.grad.data(), 0, static_cast<std::size_t>(p.grad.numel()) * sizeof(Scalar),
                                    ctx.stream()));
  }
}

/// AdamW over device parameters: the CPU AdamW's options, checks, state names and metadata; buffers on the device.
/// Holds views of the parameters; they must outlive the optimizer.
template <std::floating_point Scalar>
class AdamW<Scalar, Cuda> {
 public:
  static constexpr std::string_view kType = "adamw";

  /// @throws Error for an empty or repeated parameter name or an option out of range; ShapeError when a gradient's
  /// shape differs from its value's.
  explicit AdamW(nn::ParameterRefs<Scalar, Cuda> params, AdamWOptions options = {})
      : params_(std::move(params)), options_(options) {
    detail::check_adamw(params_, options_);
    m_.reserve(params_.size());
    v_.reserve(params_.size());
    for (const auto& p : params_) {
      m_.emplace_back(p.value.shape());  // zero-filled
      v_.emplace_back(p.value.shape());
    }
  }

  /// One update with options().lr.
  void step(CudaContext& ctx) { step(ctx, options_.lr); }

  /// One update with learning rate `lr`, on the context's stream.
  /// @throws Error if lr is negative or not finite (before anything changes); DeviceError if a launch fails.
  void step(CudaContext& ctx, double lr) {
    detail::check_non_negative("AdamW::step", "lr", lr);
    ++step_;
    const double t = static_cast<double>(step_);
    const cuda_kernels::AdamWStep c{options_.beta1,       1.0 - options_.beta1, options_.beta2,
                                    1.0 - options_.beta2, 1.0 - std::pow(options_.beta1, t),
                                    1.0 - std::pow(options_.beta2, t), options_.eps, options_.weight_decay, lr};
    constexpr int kThreads = 256;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const std::int64_t n = params_[k].value.numel();
      if (n == 0) continue;
      const unsigned blocks = std::min(backend::cuda::blocks_for(n, kThreads),
                                       static_cast<unsigned>(std::max(1, ctx.multiprocessors()) * 16));
      cuda_kernels::adamw_kernel<Scalar><<<blocks, kThreads, 0, ctx.stream()>>>(
          params_[k].value.data(), params_[k].grad.data(), m_[k].data(), v_[k].data(), n, c);
      TMOE_CUDA_CHECK_LAUNCH("adamw_kernel");
    }
  }

  [[nodiscard]] std::int64_t step_count() const noexcept { return step_; }
  [[nodiscard]] const AdamWOptions& options() const noexcept { return options_; }
  [[nodiscard]] const nn::ParameterRefs<Scalar, Cuda>& parameters() const noexcept { return params_; }

  /// The buffers as named device views ("{prefix}{name}.adam_m", then ".adam_v", parameters in order) and the
  /// metadata "{prefix}step", "{prefix}type" = "adamw", as the CPU optimizer names them.
  [[nodiscard]] OptimizerState<Scalar, Cuda> state(std::string_view prefix = "optimizer.") {
    OptimizerState<Scalar, Cuda> s;
    s.tensors.reserve(2 * params_.size());
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const std::string base = std::string(prefix) + params_[k].name;
      s.tensors.push_back({base + ".adam_m", m_[k].view()});
      s.tensors.push_back({base + ".adam_v", v_[k].view()});
    }
    s.metadata = detail::state_metadata(kType, step_, prefix);
    return s;
  }

  /// Restores the step counter from checkpoint metadata (after the buffers were copied into state(prefix).tensors).
  /// @throws Error if "{prefix}step" is missing or malformed or "{prefix}type" is not "adamw".
  void load_metadata(const std::map<std::string, std::string>& metadata, std::string_view prefix = "optimizer.") {
    step_ = detail::parse_state_metadata("AdamW::load_metadata", kType, metadata, prefix);
  }

 private:
  nn::ParameterRefs<Scalar, Cuda> params_;
  AdamWOptions options_;
  std::vector<Tensor<Scalar, Cuda>> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace tmoe::train
