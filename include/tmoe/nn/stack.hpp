#pragma once
/// @file stack.hpp
/// @brief FFN patterns of a Transformer stack, fixed at compile time: `Dense` (every block a dense FFN) or
/// `MoeEvery<Every, Config>` (block i holds an MoE layer with Config when i % Every == Every - 1, so
/// MoeEvery<2, ...> puts MoE in blocks 1, 3, 5: "every other layer", the paper's placement, starting after one
/// dense block as in GShard's implementation). The layer count is a run-time size.

#include <cstdint>
#include <type_traits>

#include "tmoe/moe/config.hpp"

namespace tmoe::nn {

/// Every block has a dense FFN.
struct Dense {
  static constexpr bool has_moe = false;
  static constexpr bool folded = false;
  static constexpr bool is_moe(std::int64_t) noexcept { return false; }
};

/// Every `Every`-th block holds an MoE layer configured by `MoeConfig` (a moe::Config).
template <int Every, class MoeConfig>
struct MoeEvery {
  static_assert(Every >= 1, "MoeEvery<Every, Config>: Every must be at least 1 (1 = MoE in every block).");
  static constexpr bool has_moe = true;
  static constexpr bool folded = false;
  using moe_config = MoeConfig;
  static constexpr int every = Every;
  static constexpr bool is_moe(std::int64_t layer) noexcept { return layer % Every == Every - 1; }
};

/// The pattern of a task-routed `MoeEvery<Every, Config>` stack after one task was extracted from it
/// (extract::subnetwork): the blocks that held MoE layers hold one dense FFN of width K * d_ff without biases, the
/// task's K experts stacked along the hidden dimension with their gate weights folded into the output projection.
/// `moe_config` is the configuration the stack was extracted from (for its activation and K).
template <int Every, class MoeConfig>
struct FoldedEvery {
  static_assert(std::is_same_v<typename MoeConfig::route_type, route::Task>,
                "FoldedEvery<Every, Config>: only task-routed MoE layers fold into a dense FFN; token and sentence "
                "routing decide per input and keep all their experts.");
  static constexpr bool has_moe = true;  // its special blocks sit where the MoE layers were
  static constexpr bool folded = true;
  using moe_config = MoeConfig;
  static constexpr int every = Every;
  static constexpr bool is_moe(std::int64_t layer) noexcept { return layer % Every == Every - 1; }
};

template <class P>
concept FfnPattern = std::same_as<P, Dense> || requires {
  typename P::moe_config;
  { P::every } -> std::convertible_to<int>;
  { P::folded } -> std::convertible_to<bool>;
};

/// Whether a pattern routes its decisions per task, folded or not (what extraction acts on).
template <FfnPattern P>
inline constexpr bool task_routed_v = [] {
  if constexpr (P::has_moe) {
    return std::is_same_v<typename P::moe_config::route_type, route::Task>;
  } else {
    return false;
  }
}();

/// Number of MoE blocks among `layers` blocks.
template <FfnPattern P>
constexpr std::int64_t moe_blocks(std::int64_t layers) noexcept {
  if constexpr (!P::has_moe) {
    return 0;
  } else {
    return layers / P::every;
  }
}

/// Whether a pattern routes by task (its MoE layers need task ids). A folded stack serves one task: no ids.
template <FfnPattern P>
inline constexpr bool routes_by_task_v = [] {
  if constexpr (P::has_moe && !P::folded) {
    return std::is_same_v<typename P::moe_config::route_type, route::Task>;
  } else {
    return false;
  }
}();

}  // namespace tmoe::nn
