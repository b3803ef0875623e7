#pragma once
/// @file clip.hpp
/// @brief Gradient clipping by global norm (Pascanu et al. 2013): if ‖g‖₂ over all parameters exceeds
/// max_norm, every gradient is scaled by max_norm / ‖g‖₂.
///
/// The norm is accumulated in double, parameters in list order and each parameter in fixed blocks, so it does not
/// depend on the thread count. A non-finite norm (an inf or NaN somewhere) leaves the gradients untouched and is
/// returned as is: the caller decides whether to skip the step (as a loss scaler would).
///
/// @code
/// const double norm = tmoe::train::clip_grad_norm(ctx, params, 1.0);
/// if (!std::isfinite(norm)) { /* skip this update */ }
/// @endcode

#include <cmath>
#include <concepts>
#include <cstdint>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/nn/parameter.hpp"
#include "tmoe/train/optimizer_state.hpp"

namespace tmoe::train {

/// sqrt(Σ_p Σ_i grad_p[i]²) over all parameters, in double, in a fixed order.
template <std::floating_point Scalar>
[[nodiscard]] double global_grad_norm(CpuContext& ctx, const nn::ParameterRefs<Scalar, Cpu>& params) {
  double sq = 0.0;
  for (const auto& p : params) {
    const Scalar* g = p.grad.data();
    sq += detail::ordered_sum(ctx, p.grad.numel(), [g](std::int64_t i) {
      const double gi = static_cast<double>(g[i]);
      return gi * gi;
    });
  }
  return std::sqrt(sq);
}

/// Scales every gradient by max_norm / norm when the global norm exceeds max_norm (exactly, no epsilon), and
/// returns the norm before clipping. A non-finite norm leaves the gradients untouched.
/// @throws Error if max_norm is not positive and finite.
template <std::floating_point Scalar>
double clip_grad_norm(CpuContext& ctx, const nn::ParameterRefs<Scalar, Cpu>& params, double max_norm) {
  detail::check_positive("clip_grad_norm", "max_norm", max_norm);
  const double norm = global_grad_norm(ctx, params);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / norm;
  for (const auto& p : params) {
    Scalar* g = p.grad.data();
    ctx.parallel_range(p.grad.numel(), 1024, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) g[i] = static_cast<Scalar>(static_cast<double>(g[i]) * scale);
    });
  }
  return norm;
}

}  // namespace tmoe::train
