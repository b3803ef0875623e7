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
  static constexpr bool is_moe(std::int64_t) noexcept { return false; }
};

/// Every `Every`-th block holds an MoE layer configured by `MoeConfig` (a moe::Config).
template <int Every, class MoeConfig>
struct MoeEvery {
  static_assert(Every >= 1, "MoeEvery<Every, Config>: Every must be at least 1 (1 = MoE in every block).");
  static constexpr bool has_moe = true;
  using moe_config = MoeConfig;
  static constexpr int every = Every;
  static constexpr bool is_moe(std::int64_t layer) noexcept { return layer % Every == Every - 1; }
};

template <class P>
concept FfnPattern = std::same_as<P, Dense> || requires {
  typename P::moe_config;
  { P::every } -> std::convertible_to<int>;
};

/// Number of MoE blocks among `layers` blocks.
template <FfnPattern P>
constexpr std::int64_t moe_blocks(std::int64_t layers) noexcept {
  if constexpr (!P::has_moe) {
    return 0;
  } else {
    return layers / P::every;
  }
}

/// Whether a pattern routes by task (its MoE layers need task ids).
template <FfnPattern P>
inline constexpr bool routes_by_task_v = [] {
  if constexpr (P::has_moe) {
    return std::is_same_v<typename P::moe_config::route_type, route::Task>;
  } else {
    return false;
  }
}();

}  // namespace tmoe::nn
