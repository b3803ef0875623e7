#pragma once
/// @file routing_plan.hpp
/// @brief RoutingPlan: everything one forward call decided, for users to inspect and for backward to replay.
///
/// Token n's choice j (j = 0 is the top-1 expert) is entry (n, j) of the (N, K) tables. Dispatched choices are
/// numbered k-major into expert-contiguous rows: expert e owns rows [expert_offset[e], expert_offset[e + 1]),
/// and within an expert every first choice (in token order) precedes every second choice.

#include <cstdint>

#include "tmoe/core/tensor.hpp"

namespace tmoe::moe {

template <class Real, DeviceTag Device>
struct RoutingPlan {
  std::int64_t tokens = 0;      ///< N, padding included
  int top_k = 0;                ///< K
  int experts = 0;              ///< E
  std::int64_t group_size = 0;  ///< S: tokens per capacity group (the last group may be shorter)
  std::int64_t capacity = -1;   ///< C per expert per group; -1 when dropless

  Tensor<std::int32_t, Device> expert;        // (N, K) chosen expert; -1 for padding tokens
  Tensor<Real, Device> gate;                  // (N, K) combine weight; 0 where not dispatched
  Tensor<std::int64_t, Device> slot;          // (N, K) queue position at the expert within the group; -1 if
                                              //        padding or skipped by the random policy
  Tensor<std::uint8_t, Device> dispatched;    // (N, K) 1 if this choice is computed (slot < C)
  Tensor<std::int64_t, Device> row;           // (N, K) expert-contiguous row; -1 if not dispatched
  Tensor<std::int64_t, Device> expert_count;  // (E) dispatched rows per expert
  Tensor<std::int64_t, Device> expert_offset; // (E + 1) exclusive prefix sum of expert_count
  Tensor<std::int64_t, Device> row_token;     // (R) token of each expert-contiguous row
  Tensor<std::int32_t, Device> row_choice;    // (R) choice index j of each row

  double aux_loss = 0;  ///< E * sum_e f_e * m_e, averaged over groups; unscaled by its coefficient
  double z_loss = 0;    ///< mean over valid tokens of logsumexp(logits)^2; unscaled

  /// Total dispatched rows R.
  [[nodiscard]] std::int64_t rows() const noexcept {
    return expert_offset.numel() == 0 ? 0 : expert_offset.data()[experts];
  }
  /// Chosen (token, expert) pairs of valid tokens that were not computed, by capacity or by the random policy.
  [[nodiscard]] std::int64_t dropped() const noexcept {
    std::int64_t d = 0;
    for (std::int64_t i = 0; i < tokens * top_k; ++i) d += (expert.data()[i] >= 0 && !dispatched.data()[i]) ? 1 : 0;
    return d;
  }
  /// Valid tokens none of whose choices was computed: their MoE output is zero.
  [[nodiscard]] std::int64_t dropped_tokens() const noexcept {
    std::int64_t d = 0;
    for (std::int64_t n = 0; n < tokens; ++n) {
      if (expert.data()[n * top_k] < 0) continue;
      bool any = false;
      for (int j = 0; j < top_k; ++j) any = any || dispatched.data()[n * top_k + j];
      d += any ? 0 : 1;
    }
    return d;
  }
};

}  // namespace tmoe::moe
